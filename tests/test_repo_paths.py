"""Files the repository names are read only inside the checkout, after symlinks (issue 10.1),
and only up to a size limit (issue 10.7).

Real files and real symlinks in tmp dirs; the "bastion secret" is a canary file outside the
repository that no rendering, error or message may ever contain.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ManifestLimits, load_host_config, load_manifest
from agent.errors import ConfigError
from providers.errors import RepoFileError, TemplateRenderError
from providers.hosts.templates import render_template
from providers.repofiles import (
    MAX_HOST_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TEMPLATE_BYTES,
    read_bounded,
    read_repo_file,
)
from tests.support.infra import InfraRepo, write_host_config

CANARY = "bastion-only-3f9c1e7a-canary"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A repository checkout and, beside it, a directory of the bastion holding a canary."""
    bastion = tmp_path / "etc"
    bastion.mkdir()
    (bastion / "shadow").write_text(f"root:{CANARY}:19000::::::\n")
    repo = tmp_path / "repo"
    (repo / "templates").mkdir(parents=True)
    (repo / "common").mkdir()
    (repo / "common" / "header.j2").write_text("# managed by gitops-agent\n")
    return repo, bastion


# --- the shared reader --------------------------------------------------------------------


def test_a_file_inside_the_repository_is_read(world: tuple[Path, Path]) -> None:
    repo, _ = world
    assert read_repo_file(repo, "common/header.j2", limit=100) == b"# managed by gitops-agent\n"


def test_a_symlink_inside_the_repository_to_another_place_inside_stays_allowed(
    world: tuple[Path, Path],
) -> None:
    repo, _ = world
    (repo / "templates" / "header.j2").symlink_to(Path("..") / "common" / "header.j2")
    (repo / "linked").symlink_to(repo / "common")  # absolute, but still inside
    assert read_repo_file(repo, "templates/header.j2", limit=100).startswith(b"# managed")
    assert read_repo_file(repo, "linked/header.j2", limit=100).startswith(b"# managed")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda repo, etc: (repo / "x").symlink_to(etc / "shadow"), id="file-link"),
        pytest.param(lambda repo, etc: (repo / "d").symlink_to(etc), id="dir-link"),
        pytest.param(
            lambda repo, etc: (repo / "d").symlink_to(Path("..") / etc.name), id="relative-link"
        ),
    ],
)
def test_a_symlink_out_of_the_repository_is_refused(world: tuple[Path, Path], make) -> None:  # type: ignore[no-untyped-def]
    repo, etc = world
    make(repo, etc)
    name = "x" if (repo / "x").is_symlink() else "d/shadow"
    with pytest.raises(RepoFileError) as caught:
        read_repo_file(repo, name, limit=MAX_TEMPLATE_BYTES)
    assert caught.value.kind == "outside"
    assert str(caught.value).startswith(f"{name}: resolves outside the repository")
    assert CANARY not in str(caught.value)


@pytest.mark.parametrize("name", ["../etc/shadow", "/etc/passwd", "a\x00b"])
def test_paths_that_leave_the_repository_by_name_are_refused(
    world: tuple[Path, Path], name: str
) -> None:
    repo, _ = world
    with pytest.raises(RepoFileError) as caught:
        read_repo_file(repo, name, limit=100)
    assert caught.value.kind == "outside"


def test_a_symlink_loop_and_a_missing_file_are_named(world: tuple[Path, Path]) -> None:
    repo, _ = world
    (repo / "loop").symlink_to(repo / "loop")
    with pytest.raises(RepoFileError) as caught:
        read_repo_file(repo, "loop", limit=100)
    assert str(caught.value) == "loop: cannot be resolved (a symlink loop)"
    with pytest.raises(RepoFileError) as caught:
        read_repo_file(repo, "nope", limit=100)
    assert caught.value.kind == "missing"


def test_a_file_over_its_limit_is_refused_before_it_is_read(world: tuple[Path, Path]) -> None:
    repo, _ = world
    (repo / "big").write_bytes(b"x" * 2049)
    with pytest.raises(RepoFileError) as caught:
        read_repo_file(repo, "big", limit=2048)
    assert str(caught.value) == (
        "big: the file has 2049 bytes, more than the limit of 2 KiB for this kind of file"
    )
    assert read_repo_file(repo, "big", limit=2049) == b"x" * 2049


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RepoFileError) as caught:
        read_bounded(tmp_path / "fifo", limit=100)
    assert caught.value.kind == "not-a-file"


# --- templates: include, import, extends ---------------------------------------------------


def _render(repo: Path, name: str, text: str) -> str:
    path = repo / "templates" / name
    path.write_text(text)
    return render_template(path, {}, display_name=f"templates/{name}", root=repo)


@pytest.mark.parametrize(
    "statement",
    [
        "{% include 'shadowdir/shadow' %}",
        "{% include 'shadowdir/shadow' ignore missing %}",
        "{% import 'shadowdir/shadow' as s %}",
        "{% from 'shadowdir/shadow' import x %}",
        "{% extends 'shadowdir/shadow' %}",
        "{% include ['nope.j2', 'shadowdir/shadow'] %}",
    ],
)
def test_a_template_cannot_reach_a_bastion_file_through_a_symlinked_directory(
    world: tuple[Path, Path], statement: str
) -> None:
    repo, etc = world
    (repo / "templates" / "shadowdir").symlink_to(etc)
    with pytest.raises(TemplateRenderError) as caught:
        _render(repo, "evil.j2", f"line one\n{statement}\n")
    assert str(caught.value) == (
        "templates/evil.j2:2: template 'shadowdir/shadow' resolves outside the repository"
        " (a symlink?); templates can only read files of the repository"
    )
    assert caught.value.line == 2
    assert CANARY not in repr(caught.value)


def test_a_symlinked_include_file_is_refused_with_the_line_of_the_include(
    world: tuple[Path, Path],
) -> None:
    repo, etc = world
    (repo / "templates" / "token.j2").symlink_to(etc / "shadow")
    (repo / "templates" / "inner.j2").write_text("a\nb\n{% include 'token.j2' %}\n")
    with pytest.raises(TemplateRenderError) as caught:
        _render(repo, "outer.j2", "{% include 'inner.j2' %}\n")
    assert str(caught.value).startswith(
        "templates/inner.j2:3: template 'token.j2' resolves outside the repository"
    )
    assert str(caught.value).endswith("(included from templates/outer.j2:1)")
    assert CANARY not in str(caught.value)


def test_the_top_template_itself_is_checked_too(world: tuple[Path, Path]) -> None:
    repo, etc = world
    (repo / "templates" / "app.j2").symlink_to(etc / "shadow")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(
            repo / "templates" / "app.j2", {}, display_name="templates/app.j2", root=repo
        )
    assert "resolves outside the repository" in str(caught.value)
    assert CANARY not in str(caught.value)


def test_a_template_including_through_a_symlink_inside_the_repository_works(
    world: tuple[Path, Path],
) -> None:
    repo, _ = world
    (repo / "templates" / "common").symlink_to(repo / "common")
    assert _render(repo, "site.j2", "{% include 'common/header.j2' %}x\n") == (
        "# managed by gitops-agent\nx\n"
    )


def test_a_template_over_the_limit_is_refused(world: tuple[Path, Path]) -> None:
    repo, _ = world
    (repo / "templates" / "big.j2").write_text("x" * (MAX_TEMPLATE_BYTES + 1))
    with pytest.raises(TemplateRenderError) as caught:
        _render(repo, "site.j2", "{% include 'big.j2' %}\n")
    assert str(caught.value) == (
        f"templates/site.j2:1: template big.j2: the file has {MAX_TEMPLATE_BYTES + 1} bytes,"
        " more than the limit of 1 MiB for this kind of file"
    )


# --- the manifest, its stacks and sources, and the host config ------------------------------


def test_a_gitops_yaml_symlinked_out_of_the_repository_is_refused(
    world: tuple[Path, Path],
) -> None:
    repo, etc = world
    (repo / "gitops.yaml").symlink_to(etc / "shadow")
    with pytest.raises(ConfigError) as caught:
        load_manifest(repo, ManifestLimits())
    assert caught.value.message.startswith("gitops.yaml:1: (file): resolves outside the repository")
    assert CANARY not in caught.value.render()


def test_a_big_manifest_is_refused_before_parsing(world: tuple[Path, Path]) -> None:
    repo, _ = world
    line = b"# " + b"x" * 1000 + b"\n"
    with open(repo / "gitops.yaml", "wb") as handle:
        for _ in range(MAX_MANIFEST_BYTES // len(line) + 1):
            handle.write(line)
    with pytest.raises(ConfigError) as caught:
        load_manifest(repo, ManifestLimits())
    size = (repo / "gitops.yaml").stat().st_size
    assert caught.value.message == (
        f"gitops.yaml:1: (file): the file has {size} bytes, more than the limit of 8 MiB"
        " for this kind of file"
    )
    assert caught.value.hint and "8 MiB" in caught.value.hint


def test_a_big_host_config_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("repo: {url: file:///x}\n" + "#" * MAX_HOST_CONFIG_BYTES)
    with pytest.raises(ConfigError) as caught:
        load_host_config(path)
    assert caught.value.message == (
        f"{path}:1: (file): the host config has more than 1 MiB (the limit)"
    )


def _manifest(repo: Path, body: str) -> None:
    (repo / "gitops.yaml").write_text("version: 1\nunits:\n" + body)


def test_a_file_source_symlinked_out_of_the_repository_is_refused_at_validation(
    world: tuple[Path, Path],
) -> None:
    repo, etc = world
    (repo / "files").mkdir()
    (repo / "files" / "token").symlink_to(etc / "shadow")
    _manifest(
        repo,
        "  - name: web\n"
        "    fleet:\n"
        "      hosts: {static: [{name: a, address: local}]}\n"
        "      resources:\n"
        "        - file: /etc/token\n"
        "          source: files/token\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_manifest(repo, ManifestLimits())
    assert caught.value.message == (
        "gitops.yaml:8: units[0].fleet.resources[0].source: expected a relative path inside"
        " the repository; got 'files/token'"
    )


def test_a_stack_with_a_tf_file_symlinked_out_of_the_repository_is_refused(
    world: tuple[Path, Path],
) -> None:
    repo, etc = world
    (repo / "stacks" / "app").mkdir(parents=True)
    (repo / "stacks" / "app" / "main.tf").write_text("# ok\n")
    (etc / "secret.tf").write_text(f"# {CANARY}\n")
    (repo / "stacks" / "app" / "leak.tf").symlink_to(etc / "secret.tf")
    _manifest(repo, "  - {name: app, stack: stacks/app}\n")
    with pytest.raises(ConfigError) as caught:
        load_manifest(repo, ManifestLimits())
    assert caught.value.message == (
        "gitops.yaml:3: units[0].stack: expected a directory holding *.tf files;"
        " got 'stacks/app' (leak.tf is a symlink out of the repository)"
    )
    (repo / "stacks" / "app" / "leak.tf").unlink()
    (repo / "stacks" / "app" / ".terraform.lock.hcl").symlink_to(etc / "shadow")
    with pytest.raises(ConfigError) as caught:
        load_manifest(repo, ManifestLimits())
    assert "(.terraform.lock.hcl is a symlink out of the repository)" in caught.value.message
    (repo / "stacks" / "app" / ".terraform.lock.hcl").unlink()
    (repo / "stacks" / "app" / "shared.tf").symlink_to(repo / "common" / "header.j2")
    assert load_manifest(repo, ManifestLimits()).units[0].stack == "stacks/app"


# --- end to end: the reproduction through the CLI ------------------------------------


def _agent(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_reconcile_dry_run_and_logs_never_show_a_file_a_symlink_points_to(
    tmp_path: Path,
) -> None:
    bastion = tmp_path / "bastion-etc"
    bastion.mkdir()
    (bastion / "shadow").write_text(f"root:{CANARY}:19000::::::\n")
    host_dir = tmp_path / "host"
    repo = InfraRepo(tmp_path / "git")
    repo.write("common/motd.j2", "welcome to {{ host.name }}\n")
    repo.write("templates/evil.j2", "line one\n{% include 'shadowdir/shadow' %}\n")
    repo.write("templates/good.j2", "{% include 'common/motd.j2' %}")
    (repo.work / "templates" / "shadowdir").symlink_to(bastion)
    (repo.work / "templates" / "common").symlink_to(Path("..") / "common")
    repo.write(
        "gitops.yaml",
        f"""\
        version: 1
        units:
          - name: web
            fleet:
              hosts: {{static: [{{name: bastion, address: local}}]}}
              resources:
                - template: {host_dir}/evil.conf
                  source: templates/evil.j2
                - template: {host_dir}/motd
                  source: templates/good.j2
        """,
    )
    repo.push("a template that includes a bastion file through a symlink")
    state = tmp_path / "state"
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        state,
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    result = _agent(config, "reconcile", "--now", "--dry-run")
    logs = _agent(config, "logs", "web")
    seen = result.stdout + result.stderr + logs.stdout + logs.stderr
    assert CANARY not in seen
    everything = [p.read_bytes() for p in state.rglob("*") if p.is_file()]
    assert not any(CANARY.encode() in data for data in everything)
    expected = "templates/evil.j2:2: template 'shadowdir/shadow' resolves outside the repository"
    assert expected in seen, seen
    assert not host_dir.exists()  # a dry run, and the host failed before anything
    # Without the bad template, the include through a symlink inside the repository works.
    text = (repo.work / "gitops.yaml").read_text()
    text = text.replace(
        f"        - template: {host_dir}/evil.conf\n          source: templates/evil.j2\n",
        f"        - directory: {host_dir}\n",
    )
    (repo.work / "gitops.yaml").write_text(text)
    repo.push("only the good template")
    result = _agent(config, "reconcile", "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (host_dir / "motd").read_text() == "welcome to bastion\n"


def test_a_cached_include_is_checked_again_when_its_symlink_moves(
    world: tuple[Path, Path],
) -> None:
    """Compiled templates are kept between passes; a new revision that repoints a
    symlink from inside the repository to a bastion file must not reuse the old one."""
    repo, etc = world
    link = repo / "templates" / "part.j2"
    link.symlink_to(repo / "common" / "header.j2")
    assert _render(repo, "site.j2", "{% include 'part.j2' %}") == "# managed by gitops-agent\n"
    link.unlink()
    link.symlink_to(etc / "shadow")
    with pytest.raises(TemplateRenderError) as caught:
        _render(repo, "site.j2", "{% include 'part.j2' %}")
    assert "template 'part.j2' resolves outside the repository" in str(caught.value)
