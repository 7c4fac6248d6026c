"""LocalTransport: the agent's own machine as a host, through real subprocesses."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from providers.errors import TransportError
from providers.transport import LocalTransport


def test_run_passes_stdin_and_gives_back_exit_code_and_both_streams() -> None:
    with LocalTransport("bastion") as local:
        done = local.run(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"hi\0there", timeout=10)
        assert (done.exit_code, done.stdout, done.stderr) == (3, b"hi\0there", b"oops\n")
        # argv goes to the program as is: no shell in between.
        assert local.run(["printf", "%s|", "a b", "$HOME"], timeout=10).stdout == b"a b|$HOME|"


def test_megabytes_of_stdin_and_output_on_both_streams_at_once() -> None:
    data = os.urandom(6 * 1024 * 1024)
    done = LocalTransport().run(["sh", "-c", "tee /dev/stderr"], stdin=data, timeout=60)
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(done.stdout).hexdigest() == digest
    assert hashlib.sha256(done.stderr).hexdigest() == digest


def test_become_runs_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("as a plain user `become` needs passwordless sudo on this machine")
    assert LocalTransport().run(["id", "-u"], timeout=10, become=True).stdout == b"0\n"


def test_timeout_is_retryable_and_names_the_host() -> None:
    local = LocalTransport("bastion")
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        local.run(["sleep", "30"], stdin=b"s3cret", timeout=0.3)
    assert time.monotonic() - started < 2.5
    assert caught.value.retryable is True
    assert str(caught.value) == "bastion: sleep did not finish within 0.3s"


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(TransportError) as caught:
        LocalTransport("bastion").run(["no-such-program-here"], timeout=10)
    assert str(caught.value).startswith("bastion: cannot run no-such-program-here")
    assert caught.value.retryable is False


def test_round_trips_count_each_run() -> None:
    local = LocalTransport()
    for _ in range(3):
        local.run(["true"], timeout=10)
    with pytest.raises(TransportError):
        local.run(["sleep", "5"], timeout=0.1)
    assert local.round_trips == 4
    local.close()
    local.close()
