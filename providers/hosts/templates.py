"""Rendering the repo's Jinja2 templates into file contents, with errors that name the line.

Strict: an undefined variable is an error, never an empty string. Trailing newlines are
kept and nothing is HTML-escaped (these are config files). Templates run in Jinja's
sandbox: a template from a pull request cannot reach Python internals (`__class__`...)
to read the agent's memory. `{% include %}`, `{% import %}` and `{% extends %}` resolve in
the template's own directory and below, and every template file, once its symlinks are
followed, must be inside the repository checkout (`root`) and at most
`MAX_TEMPLATE_BYTES`: a pull request cannot include `/etc/shadow` through a symlink.

A thread can bound the templates it renders (`render_deadline`, used for a proposal's plan,
whose templates nobody has reviewed): the template's own code is traced line by line and
stops at the deadline (Jinja's sandbox caps `range`, not loops nested over it), `*` and
`**` may not build a value over `MAX_RENDERED_BYTES`, nor may the output, and `lipsum` is
gone. A filter given a huge width (`center`, `indent`, `wordwrap`) can still allocate one
large string: that is the process's memory limit's job (`MemoryMax=` in the unit).

Compiled templates are kept between calls (one environment per template directory), so
a fleet of N hosts compiles each template once, not N times: compiling a template takes
10-30 ms, rendering it well under 1 ms. A template file that changes on disk (a new
revision checked out) is compiled again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from providers.errors import RepoFileError, TemplateRenderError
from providers.repofiles import MAX_TEMPLATE_BYTES, confine, read_bounded


class TemplateRefused(jinja2.TemplateError):
    """A template file the loader will not read: outside the repository once its symlinks
    are followed, or too large. Not a TemplateNotFound, so `ignore missing` cannot hide it."""


class _Loader(jinja2.BaseLoader):
    """Loads templates from one directory of the repository checkout.

    Every file is resolved (symlinks followed) and must lie inside `root`; it is read with
    a size limit. A cached template is stale as soon as its file's mtime, size or inode
    differ (Jinja's own check compares the float mtime only).
    """

    def __init__(self, directory: str, root: str) -> None:
        self.directory = Path(directory)
        self.root = Path(root)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        # Jinja's own splitting: refuses `..`, drops empty and `.` parts.
        pieces = jinja2.loaders.split_template_path(template)
        candidate = self.directory.joinpath(*pieces)
        try:
            resolved = confine(self.root, candidate)
            data = read_bounded(resolved, limit=MAX_TEMPLATE_BYTES, shown=template, follow=False)
        except RepoFileError as exc:
            if exc.kind in ("missing", "not-a-file"):
                raise jinja2.TemplateNotFound(template) from None
            if exc.kind == "outside":
                raise TemplateRefused(
                    f"template {template!r} resolves outside the repository (a symlink?);"
                    " templates can only read files of the repository"
                ) from None
            raise TemplateRefused(f"template {exc}") from None
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TemplateRefused(f"template {template!r} is not UTF-8 text") from None
        # The name Jinja knows (and tracebacks show) is the path inside the directory, not
        # the symlink's target: messages name the file the repository wrote.
        filename = str(candidate)
        # Stamped after reading, as Jinja does: the agent never rewrites its checkout
        # while a pass renders, so the text and the stamp belong together.
        # A new revision may point a symlink elsewhere without touching the old target:
        # the cached template is stale then too (and the new target is checked again).
        stamp = _stamp(str(resolved))
        return (
            source,
            filename,
            lambda: os.path.realpath(candidate) == str(resolved) and _stamp(str(resolved)) == stamp,
        )


def _stamp(filename: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(filename)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


MAX_RENDERED_BYTES = 16 * 1024 * 1024  # a rendered file, or one value built by `*` / `**`
_CHECK_EVERY = 2000  # template lines between two looks at the clock

_bound = threading.local()  # this thread's deadline (time.monotonic()), or none


class RenderLimitExceeded(jinja2.TemplateError):
    """A bounded render ran past its deadline or built too large a value."""


@contextlib.contextmanager
def render_deadline(deadline: float | None) -> Iterator[None]:
    """Templates this thread renders inside the block stop at `deadline` (a
    time.monotonic() value; None: unbounded) with a TemplateRenderError that says so."""
    previous = getattr(_bound, "deadline", None)
    if deadline is not None and previous is not None:
        deadline = min(deadline, previous)
    _bound.deadline = deadline if deadline is not None else previous
    try:
        yield
    finally:
        _bound.deadline = previous


class _BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, with `*` and `**` refused when the bounded thread's result would
    pass MAX_RENDERED_BYTES, and without `lipsum` (it builds text of any size)."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if getattr(_bound, "deadline", None) is not None:
            _check_size(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _check_size(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for sized, times in ((left, right), (right, left)):
            sequence = isinstance(sized, str | bytes | list | tuple) and isinstance(times, int)
            if sequence and len(sized) * times > MAX_RENDERED_BYTES:
                raise RenderLimitExceeded(
                    f"a value of {len(sized)} x {times} items is over the"
                    f" {MAX_RENDERED_BYTES} limit"
                )
        return
    # left ** right has about right * log2|left| bits.
    integers = isinstance(left, int) and isinstance(right, int) and abs(left) > 1
    if integers and right * abs(left).bit_length() > MAX_RENDERED_BYTES * 8:
        raise RenderLimitExceeded(f"{left} ** {right} is over the size limit")


class _DeadlineTracer:
    """Traces the template's own code (compiled templates are frames whose file is not a
    .py file) and raises once the deadline passed; Python code of Jinja runs untraced."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.lines = 0

    def on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        return None if frame.f_code.co_filename.endswith(".py") else self.on_line

    def on_line(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.lines += 1
        if self.lines % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise RenderLimitExceeded("rendering took too long: stopped at its deadline")
        return self.on_line


def _render(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    deadline = getattr(_bound, "deadline", None)
    if deadline is None:
        return template.render(**variables)
    tracer = _DeadlineTracer(deadline)
    previous = sys.gettrace()
    sys.settrace(tracer.on_call)
    try:
        chunks: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_BYTES:
                raise RenderLimitExceeded(f"the output is over {MAX_RENDERED_BYTES} bytes")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=32)
def _environment(directory: str, root: str) -> SandboxedEnvironment:
    """The environment of one template directory, shared by every call (and thread: Jinja
    environments are safe to share) so that its template cache is used."""
    return _BoundedEnvironment(
        loader=_Loader(directory, root),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        cache_size=1000,
    )


def _display(filename: str | None, path: Path, display_name: str) -> str:
    """A template file as the user knows it: relative to the repo, like `display_name`."""
    if filename is None:
        return display_name
    # The loader names files by their place in the template directory (never a symlink's
    # target), so a lexical comparison is right.
    try:
        relative = Path(filename).relative_to(path.parent)
    except ValueError:
        return filename
    return str(PurePosixPath(display_name).parent / PurePosixPath(*relative.parts))


def _template_frames(exc: BaseException, path: Path) -> list[tuple[str, int]]:
    """(file, line) of the template frames in the traceback, outermost first.

    Jinja rewrites tracebacks so that template code appears as frames whose filename is
    the template file and whose line is the template's line.
    """
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        candidate = Path(frame.filename)
        if candidate.suffix != ".py" and candidate.is_relative_to(path.parent):
            frames.append((frame.filename, frame.lineno or 0))
    return frames


def render_template(
    path: Path, variables: Mapping[str, Any], *, display_name: str, root: Path | None = None
) -> str:
    """Render the template at `path` with `variables`.

    `display_name` is the path users know (repo-relative, `templates/nginx.conf.j2`);
    every error names it and the line: `templates/nginx.conf.j2:7: 'workers' is
    undefined`. `root` is the repository checkout: the template and everything it
    includes must resolve inside it (default: the template's own directory).
    Raises TemplateRenderError.
    """
    environment = _environment(str(path.parent), str(root if root is not None else path.parent))
    try:
        template = environment.get_template(path.name)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRenderError(
            f"{display_name}:{exc.lineno}: {exc.message}",
            template=display_name,
            line=exc.lineno,
            syntax=True,
        ) from None
    except jinja2.TemplateNotFound:
        raise TemplateRenderError(
            f"{display_name}: cannot read the template: no such file", template=display_name
        ) from None
    except TemplateRefused as exc:
        raise TemplateRenderError(
            f"{display_name}: cannot read the template: {exc.message}", template=display_name
        ) from None
    try:
        return _render(template, variables)
    except jinja2.TemplateSyntaxError as exc:  # in an included template
        where = _display(exc.filename, path, display_name)
        raise TemplateRenderError(
            f"{where}:{exc.lineno}: {exc.message}", template=where, line=exc.lineno, syntax=True
        ) from None
    except Exception as exc:  # template code may raise anything: it is the user's code
        frames = _template_frames(exc, path)
        message = exc.message if isinstance(exc, jinja2.TemplateError) else None
        reason = message or f"{type(exc).__name__}: {exc}"
        if isinstance(exc, jinja2.TemplateNotFound):
            reason = f"included template {exc.name!r} not found next to {display_name}"
        if not frames:
            raise TemplateRenderError(f"{display_name}: {reason}", template=display_name) from None
        filename, line = frames[-1]
        where = _display(filename, path, display_name)
        chain = "".join(
            f" (included from {_display(outer, path, display_name)}:{outer_line})"
            for outer, outer_line in reversed(frames[:-1])
        )
        raise TemplateRenderError(
            f"{where}:{line}: {reason}{chain}", template=where, line=line
        ) from None


def render_string(text: str, variables: Mapping[str, Any], *, display_name: str) -> str:
    """Render a short template given inline (a command line, an environment value).

    Same sandbox and strictness as files; errors name `display_name` (where the string
    is written, e.g. `gitops.yaml:20: roles.app[2].env.TOKEN`). Raises TemplateRenderError.
    """
    if "{" not in text:
        return text  # nothing to render: skip building a template
    environment = _BoundedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    try:
        return _render(environment.from_string(text), variables)
    except jinja2.TemplateError as exc:
        raise TemplateRenderError(
            f"{display_name}: {exc.message}",
            template=display_name,
            syntax=isinstance(exc, jinja2.TemplateSyntaxError),
        ) from None
    except Exception as exc:  # the user's template code may raise anything
        raise TemplateRenderError(
            f"{display_name}: {type(exc).__name__}: {exc}", template=display_name
        ) from None


def reads_variable(text: str, name: str) -> bool:
    """True when the inline template `text` reads the variable `name` at all (`{{ name.x }}`,
    `{{ name['x'] | upper }}`, `{% set y = name %}{{ y }}`...): anything derived from
    it has to start from its name. A text Jinja cannot parse counts when it mentions
    `name` (its render fails anyway, but validation must not let it through)."""
    if "{" not in text:
        return False
    environment = SandboxedEnvironment()
    try:
        parsed = environment.parse(text)
    except jinja2.TemplateSyntaxError:
        return name in text
    return name in jinja2.meta.find_undeclared_variables(parsed)
