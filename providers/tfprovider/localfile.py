"""The `localfile` provider: one resource, `localfile_file`, a file on this machine.

`read` looks at the real file, so a file edited, chmod-ed or deleted by hand shows up as
drift and the next apply puts it back.

Terraform starts this provider about three times per plan: keep the imports here to the
few `tf` modules the schema needs (the gRPC machinery is loaded by `tf.runner` itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from tf.iface import (
    Config,
    CreateContext,
    DataSource,
    DeleteContext,
    PlanContext,
    Provider,
    ReadContext,
    Resource,
    State,
    UpdateContext,
    UpgradeContext,
)
from tf.schema import Attribute, Schema
from tf.types import String, Unknown
from tf.utils import Diagnostics

from providers.tfprovider import PROVIDER_ADDRESS

DEFAULT_PERMISSION = "0644"


class LocalFileProvider(Provider):
    """The provider itself: no configuration, one resource type."""

    def get_model_prefix(self) -> str:
        return "localfile_"

    def full_name(self) -> str:
        return PROVIDER_ADDRESS

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return Schema(attributes=[])

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        pass

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        pass

    def get_data_sources(self) -> list[type[DataSource]]:
        return []

    def get_resources(self) -> list[type[Resource]]:
        return [FileResource]


class FileResource(Resource):
    """`localfile_file`: a file with the given content and permission bits.

    `file_permission` is optional and NOT computed: when the configuration leaves it out the
    file gets 0644 and the state records null. (Were it computed, Terraform would keep the
    prior value whenever the configuration is null, and a `chmod` by hand would be silently
    accepted instead of reverted.) `read` reports the real mode whenever it differs from the
    one wanted, so a changed mode is drift either way.
    """

    def __init__(self, provider: LocalFileProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "file"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=1,
            attributes=[
                Attribute("id", String(), computed=True, description="The path of the file."),
                Attribute(
                    "path",
                    String(),
                    required=True,
                    requires_replace=True,
                    description="Absolute path of the file; parent directories are created.",
                ),
                Attribute("content", String(), required=True, description="The file's content."),
                Attribute(
                    "file_permission",
                    String(),
                    optional=True,
                    description=f'Octal mode such as "0600" (default {DEFAULT_PERMISSION}).',
                ),
                Attribute(
                    "sha256", String(), computed=True, description="SHA-256 of the content (hex)."
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        path = config.get("path")
        if isinstance(path, str) and not os.path.isabs(path):
            diags.add_error(f"{type_name}.path must be absolute, got {path!r}", path=["path"])
        mode = config.get("file_permission")
        if isinstance(mode, str) and _parse_mode(mode) is None:
            diags.add_error(
                f'{type_name}.file_permission must be an octal mode like "0644", got {mode!r}',
                path=["file_permission"],
            )

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State:
        content = planned.get("content")
        planned["sha256"] = Unknown if content is Unknown else _sha256(content)
        return planned

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        try:
            _write(planned["path"], planned["content"], _wanted_mode(planned))
        except OSError as exc:
            ctx.diagnostics.add_error(f"cannot write {planned['path']}", str(exc))
            return None
        return _state(planned, planned["content"])

    def read(self, ctx: ReadContext, current: State) -> State | None:
        path = current["path"]
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None  # gone: Terraform plans to create it again
        except OSError as exc:
            ctx.diagnostics.add_error(f"cannot read {path}", str(exc))
            return current
        # Not UTF-8 (someone wrote binary into it): replacement characters make it drift.
        state = _state(current, data.decode("utf-8", errors="replace"))
        actual = st.st_mode & 0o7777
        if actual != _wanted_mode(current):
            state["file_permission"] = f"{actual:04o}"
        return state

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        try:
            _write(planned["path"], planned["content"], _wanted_mode(planned))
        except OSError as exc:
            ctx.diagnostics.add_error(f"cannot write {planned['path']}", str(exc))
            return None
        return _state(planned, planned["content"])

    def delete(self, ctx: DeleteContext, current: State) -> None:
        try:
            os.unlink(current["path"])
        except FileNotFoundError:
            pass
        except OSError as exc:
            ctx.diagnostics.add_error(f"cannot delete {current['path']}", str(exc))

    def upgrade(self, ctx: UpgradeContext, version: int, old: State) -> State:
        # Nothing to migrate yet; the default implementation warns on every plan.
        return old


def _state(base: State, content: str) -> State:
    return {
        "id": base["path"],
        "path": base["path"],
        "content": content,
        "file_permission": base.get("file_permission"),
        "sha256": _sha256(content),
    }


def _sha256(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _parse_mode(text: str) -> int | None:
    try:
        mode = int(text, 8)
    except ValueError:
        return None
    return mode if 0 <= mode <= 0o7777 else None


def _wanted_mode(state: State) -> int:
    return _parse_mode(state.get("file_permission") or DEFAULT_PERMISSION) or 0o644


def _write(path: str, content: str, mode: int) -> None:
    """Write atomically: a temp file in the same directory, fsync, chmod, rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
