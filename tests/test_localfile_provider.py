"""The `localfile` provider: its resource on its own, then driven by real Terraform."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tf.iface import CreateContext, DeleteContext, ReadContext, UpdateContext
from tf.utils import Diagnostics

from providers.terraform import summarize_plan
from providers.tfprovider.localfile import FileResource, LocalFileProvider
from tests.tfhelpers import (
    LOCALFILE_REQUIRED,
    Lines,
    deadline_in,
    make_runner,
    make_workspace,
    plan_and_show,
    write_files,
)

TYPE = "localfile_file"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the resource on its own (the same calls the provider server makes) ---------------------


def test_resource_lifecycle_on_disk(tmp_path: Path) -> None:
    resource = FileResource(LocalFileProvider())
    diags = Diagnostics()
    path = tmp_path / "a" / "b" / "f.txt"
    planned = {"id": None, "path": str(path), "content": "one\n", "file_permission": None}

    state = resource.create(CreateContext(diags, TYPE), dict(planned))
    assert state == {**planned, "id": str(path), "sha256": sha("one\n")}
    assert path.read_text() == "one\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]  # no temp file left
    assert resource.read(ReadContext(diags, TYPE), state) == state

    path.write_bytes(b"\xff\xfe binary")
    path.chmod(0o600)
    drifted = resource.read(ReadContext(diags, TYPE), state)
    assert drifted is not None
    assert drifted["content"] == "\ufffd\ufffd binary"
    assert drifted["file_permission"] == "0600"

    wanted = {**state, "file_permission": "0640", "content": "two\n"}
    updated = resource.update(UpdateContext(diags, TYPE), drifted, wanted)
    assert updated == {**wanted, "sha256": sha("two\n")}
    assert (path.read_text(), path.stat().st_mode & 0o777) == ("two\n", 0o640)

    resource.delete(DeleteContext(diags, TYPE), updated)
    assert not path.exists()
    assert resource.read(ReadContext(diags, TYPE), updated) is None
    resource.delete(DeleteContext(diags, TYPE), updated)  # already gone: fine
    assert not diags.has_errors()


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"path": "/tmp/x", "content": "", "file_permission": "0600"}, None),
        ({"path": "relative/x", "content": ""}, "path must be absolute"),
        ({"path": "/tmp/x", "content": "", "file_permission": "rw-r--r--"}, "octal mode"),
        ({"path": "/tmp/x", "content": "", "file_permission": "99999"}, "octal mode"),
        ({"path": "/tmp/x", "content": "", "sha256": "abc"}, "read-only"),
    ],
)
def test_validate(config: dict, error: str | None) -> None:
    diags = Diagnostics()
    FileResource(LocalFileProvider()).validate(diags, TYPE, config)
    if error is None:
        assert not diags.has_errors()
    else:
        assert diags.has_errors()
        assert error in str(diags)


# --- with Terraform ---------------------------------------------------------------------------


def stack(greeting: Path, secret: Path | None) -> dict[str, str]:
    text = f"""
resource "localfile_file" "greeting" {{
  path    = "{greeting}"
  content = "hello\\n"
}}

output "greeting_sha256" {{
  value = localfile_file.greeting.sha256
}}
"""
    if secret:
        text += f"""
resource "localfile_file" "secret" {{
  path            = "{secret}"
  content         = "s3cret\\n"
  file_permission = "0600"
}}
"""
    return {"main.tf": LOCALFILE_REQUIRED + text}


def actions(plan_json: dict) -> dict[str, list[str]]:
    return {c.address: list(c.actions) for c in summarize_plan(plan_json).changes}


def drift(plan_json: dict) -> list[str]:
    return [c.address for c in summarize_plan(plan_json).drift]


def test_drift_is_seen_and_put_back(tmp_path: Path) -> None:
    greeting = tmp_path / "managed" / "greeting.txt"
    secret = tmp_path / "managed" / "secret.txt"
    runner = make_runner(tmp_path)
    ws = make_workspace(tmp_path, stack(greeting, secret))

    def apply(plan_file: Path) -> Lines:
        lines = Lines()
        runner.apply(ws, plan_file, {}, lines, deadline_in(60))
        return lines

    # Create.
    code, plan, plan_file = plan_and_show(runner, ws)
    assert code == 2
    assert actions(plan) == {
        "localfile_file.greeting": ["create"],
        "localfile_file.secret": ["create"],
    }
    lines = apply(plan_file)
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in lines
    assert not any("default upgrade" in line for line in lines)
    assert greeting.read_text() == "hello\n"
    assert greeting.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600
    assert runner.outputs(ws, deadline_in(30)) == {"greeting_sha256": sha("hello\n")}

    # Nothing to do.
    code, plan, _ = plan_and_show(runner, ws)
    assert (code, actions(plan), drift(plan)) == (0, {}, [])

    # Edited by hand: drift, and apply puts the content back.
    greeting.write_text("edited by hand\n")
    code, plan, plan_file = plan_and_show(runner, ws)
    assert code == 2
    assert drift(plan) == ["localfile_file.greeting"]
    assert actions(plan) == {"localfile_file.greeting": ["update"]}
    apply(plan_file)
    assert greeting.read_text() == "hello\n"

    # Modes changed by hand, with the default mode and with an explicit one.
    greeting.chmod(0o600)
    secret.chmod(0o644)
    code, plan, plan_file = plan_and_show(runner, ws)
    assert code == 2
    assert sorted(drift(plan)) == ["localfile_file.greeting", "localfile_file.secret"]
    apply(plan_file)
    assert greeting.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600

    # Deleted by hand: planned again as a create.
    greeting.unlink()
    code, plan, plan_file = plan_and_show(runner, ws)
    assert code == 2
    assert actions(plan) == {"localfile_file.greeting": ["create"]}
    apply(plan_file)
    assert greeting.read_text() == "hello\n"

    # A new path replaces the file; a resource removed from the config deletes it.
    moved = tmp_path / "managed" / "moved.txt"
    write_files(ws.stack_dir, stack(moved, None))
    code, plan, plan_file = plan_and_show(runner, ws)
    summary = summarize_plan(plan)
    assert code == 2
    assert summary.replaced == ("localfile_file.greeting",)
    assert (summary.add, summary.change, summary.destroy) == (1, 0, 2)
    assert summary.destroys_anything
    apply(plan_file)
    assert not greeting.exists()
    assert not secret.exists()
    assert moved.read_text() == "hello\n"

    # The checkout holds no state, no .terraform and no lock file: Terraform runs in the
    # unit's shadow of the stack.
    assert sorted(p.name for p in ws.stack_dir.iterdir()) == ["main.tf"]
