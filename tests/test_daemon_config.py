"""The daemon's host config keys: the documented example parses, and the files it points at
(webhook secrets, notification URLs) are read as documented. Bad files are in
tests/cases/config/host/."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import parse_host_config
from agent.config.service import DaemonConfig, read_secret_file
from agent.errors import ConfigError

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_documented_complete_example_parses() -> None:
    text = (DOCS / "host-config.md").read_text()
    example = re.search(r"## A complete example\n\n(?:<!--.*?-->\n)?```yaml\n(.*?)```", text, re.S)
    assert example, "docs/host-config.md has no complete example"
    host = parse_host_config(example.group(1), "agent.yaml", Path("/etc/gitops-agent"))

    service = host.service
    assert service.http is not None
    assert (service.http.host, service.http.port, service.http.max_body) == (
        "0.0.0.0",
        9100,
        1024 * 1024,
    )
    github = service.http.webhooks["github"]
    assert github.kind == "github"
    assert github.secret_file == Path("/etc/gitops-agent/webhook-github")
    assert re.fullmatch(r"agent\.yaml:\d+: http\.webhooks\.github\.secret_file", github.where)
    assert service.control_socket == Path("/run/gitops-agent/control.sock")
    (slack,) = service.notifications
    assert slack.kind == "slack" and slack.url is None
    assert slack.events == {"failure", "drift", "hold"}
    assert service.daemon == DaemonConfig(jitter=10.0, stop_timeout=1800.0, backoff_max=1800.0)
    assert host.intervals.units["network"].drift == 3600.0


def test_the_smallest_config_has_no_listener_and_the_default_socket() -> None:
    host = parse_host_config("repo: {url: file:///srv/infra.git}\n", "a.yaml", Path("/etc"))
    assert host.service.http is None
    assert host.service.control_socket == Path("/run/gitops-agent/control.sock")
    assert host.service.notifications == ()
    assert dict(host.intervals.units) == {}
    # Default jitter: a tenth of the interval, at most a minute.
    assert host.service.daemon.jitter_for(60) == 6.0
    assert host.service.daemon.jitter_for(3600) == 60.0


def test_an_inline_url_is_never_in_repr() -> None:
    text = (
        "repo: {url: file:///srv/infra.git}\n"
        "notifications:\n  - {kind: webhook, url: 'https://h.example/hook?token=s3cr3t-tok'}\n"
    )
    (sink,) = parse_host_config(text, "a.yaml", Path("/etc")).service.notifications
    assert sink.url == "https://h.example/hook?token=s3cr3t-tok"
    assert "s3cr3t" not in repr(sink)


def test_a_secret_file_is_read_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("hunter2-but-longer\n")
    path.chmod(0o600)
    assert read_secret_file(path, "agent.yaml:9: http.webhooks.gh.secret_file", "x") == (
        "hunter2-but-longer"
    )


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "cannot read .* which should hold the github secret: No such file"),
        ("world", "its mode is 0644: other users can read it"),
        ("empty", "is empty; it should hold the github secret"),
        ("directory", "is not a regular file"),
    ],
)
def test_a_bad_secret_file_names_the_key_and_never_the_content(
    tmp_path: Path, setup: str, expected: str
) -> None:
    path = tmp_path / "secret"
    if setup == "world":
        path.write_text("visible-secret-value\n")
        path.chmod(0o644)
    elif setup == "empty":
        path.write_text("\n")
        path.chmod(0o600)
    elif setup == "directory":
        path.mkdir(mode=0o700)
    where = "agent.yaml:9: http.webhooks.gh.secret_file"
    with pytest.raises(ConfigError) as caught:
        read_secret_file(path, where, "the github secret")
    assert caught.value.message.startswith(where)
    assert re.search(expected, caught.value.message)
    assert "visible-secret-value" not in caught.value.render()


_KEYS = [
    "http", "listen", "max_body", "webhooks", "kind", "secret_file", "control_socket",
    "notifications", "url", "url_file", "events", "timeout", "daemon", "jitter",
    "stop_timeout", "backoff_max", "intervals", "units", "drift", "github", "slack", "apply",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(["127.0.0.1:9100", "[::1]:0", ":80", "1MiB", "5s", "github", "slack"]),
    st.sampled_from(["https://h/x", "ftp://x", "http://[::1", "/etc/x", "app", "-1s"]),
    st.text(max_size=10),
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(document=_DOCUMENTS)
def test_fuzz_the_daemon_keys_raise_only_config_errors(document: object) -> None:
    for key in ("http", "notifications", "daemon", "intervals", "control_socket"):
        text = yaml.safe_dump({"repo": {"url": "file:///srv/infra.git"}, key: document})
        with contextlib.suppress(ConfigError):
            parse_host_config(text, "agent.yaml", Path("/etc/gitops-agent"))
