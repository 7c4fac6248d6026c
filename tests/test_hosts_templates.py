"""Template rendering: strict, newline-preserving, and errors that name the file and line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from providers.errors import ProviderError, TemplateRenderError
from providers.hosts.templates import render_deadline, render_string, render_template


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_renders_variables_loops_and_keeps_the_trailing_newline(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "nginx.conf.j2",
        "worker_processes {{ workers }};\n"
        "{% for port in ports %}listen {{ port }};\n{% endfor %}"
        "# <b>&</b> stays as written\n",
    )
    text = render_template(
        path, {"workers": 4, "ports": [80, 443]}, display_name="templates/nginx.conf.j2"
    )
    assert text == ("worker_processes 4;\nlisten 80;\nlisten 443;\n# <b>&</b> stays as written\n")


def test_an_undefined_variable_names_the_file_and_the_real_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "nginx.conf.j2",
        "user www-data;\n\n# comment\n\n\n\nworker_processes {{ workers }};\n",
    )
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {}, display_name="templates/nginx.conf.j2")
    assert str(caught.value) == "templates/nginx.conf.j2:7: 'workers' is undefined"
    assert caught.value.line == 7
    assert isinstance(caught.value, ProviderError)


def test_an_undefined_attribute_is_an_error_too(tmp_path: Path) -> None:
    path = _write(tmp_path, "app.env.j2", "A=1\nDB={{ db.host }}\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {"db": {"port": 5432}}, display_name="roles/app/app.env.j2")
    assert str(caught.value) == "roles/app/app.env.j2:2: 'dict object' has no attribute 'host'"


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "motd.j2", "hello\n{% if admin %}\nhi {{ name | }}\n{% endif %}\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {"admin": True}, display_name="templates/motd.j2")
    assert (
        str(caught.value)
        == "templates/motd.j2:3: expected token 'name', got 'end of print statement'"
    )
    assert caught.value.line == 3


def test_an_unclosed_block_is_a_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "motd.j2", "hello\n{% if admin %}\nhi admin\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {"admin": True}, display_name="templates/motd.j2")
    assert str(caught.value).startswith("templates/motd.j2:")
    assert "Unexpected end of template" in str(caught.value)


def test_an_error_in_an_included_template_names_that_file(tmp_path: Path) -> None:
    _write(tmp_path, "upstreams.j2", "upstream app {\n  server {{ backend }};\n}\n")
    path = _write(tmp_path, "site.j2", "# site\n{% include 'upstreams.j2' %}\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {}, display_name="templates/site.j2")
    assert str(caught.value) == (
        "templates/upstreams.j2:2: 'backend' is undefined (included from templates/site.j2:2)"
    )


def test_a_failing_expression_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.j2", "a\nb\n{{ 1 // zero }}\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {"zero": 0}, display_name="templates/x.j2")
    assert (
        str(caught.value)
        == "templates/x.j2:3: ZeroDivisionError: integer division or modulo by zero"
    )


def test_the_sandbox_keeps_python_internals_out_of_reach(tmp_path: Path) -> None:
    path = _write(tmp_path, "evil.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}\n")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(path, {}, display_name="templates/evil.j2")
    assert str(caught.value).startswith("templates/evil.j2:1: ")
    assert "unsafe" in str(caught.value)


def test_a_missing_template_is_named(tmp_path: Path) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render_template(tmp_path / "nope.j2", {}, display_name="templates/nope.j2")
    assert str(caught.value) == "templates/nope.j2: cannot read the template: no such file"


LOOPS = "a\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n"


def test_a_deadline_stops_a_template_that_loops_and_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "loop.j2", LOOPS)
    started = time.monotonic()
    with (
        render_deadline(started + 0.5),
        pytest.raises(TemplateRenderError, match=r"^templates/loop\.j2:2: rendering took too long"),
    ):
        render_template(path, {}, display_name="templates/loop.j2")
    # Stopped, not run to its end (10^10 iterations), and the bound is gone after the block.
    assert time.monotonic() - started < 60
    ok = _write(tmp_path, "ok.j2", "{% for i in range(3) %}{{ i * 2 }}{% endfor %}{{ 2 ** 8 }}\n")
    assert render_template(ok, {}, display_name="ok.j2") == "024256\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{{ "x" * 10**9 }}', "a value of 1 x 1000000000 items is over"),
        ("{{ [1, 2] * 10**8 }}", "a value of 2 x 100000000 items is over"),
        ("{{ 7 ** (10**9) }}", "is over the size limit"),
        ('{% for i in range(99999) %}{{ "y" * 1000 }}{% endfor %}', "the output is over"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ],
)
def test_a_bounded_render_refuses_huge_values(tmp_path: Path, text: str, reason: str) -> None:
    path = _write(tmp_path, "big.j2", text)
    with render_deadline(time.monotonic() + 30), pytest.raises(TemplateRenderError, match=reason):
        render_template(path, {}, display_name="big.j2")


def test_an_inline_template_is_bounded_too() -> None:
    loops = LOOPS.replace("\n", " ")
    with (
        render_deadline(time.monotonic() + 0.3),
        pytest.raises(TemplateRenderError, match=r"gitops\.yaml:3: run: rendering took too long"),
    ):
        render_string(loops, {}, display_name="gitops.yaml:3: run")
