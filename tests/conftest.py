"""Fixtures shared by the whole test suite.

`nspawn_hosts`: two real Debian hosts (systemd as PID 1, apt/dpkg, sshd, sudo) booted with
systemd-nspawn once per session, each reachable over SSH on 127.0.0.1 as `deploy` (passwordless
sudo) or root with `host.key_file`, host keys in `host.known_hosts`, and the local test apt
repository (tests/support/aptrepo.py: testpkg, testpkg-lib, testsvc) as their only apt source.
Tests that change a host (install, enable) should undo it or use a fixture of their own:
`nspawn_hosts_fixture(count, scope="module")`. See docs/testing.md.
"""

from tests.support.nspawn import nspawn_hosts_fixture
from tests.support.stores import open_store, postgres_cluster  # noqa: F401 (fixtures)

nspawn_hosts = nspawn_hosts_fixture(2, scope="session")
