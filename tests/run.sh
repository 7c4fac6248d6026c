#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs it:
# Debian packages (apt-get), a virtualenv in .venv with the package and its test
# extras, the lint checks, and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(git openssh-server openssh-client python3-venv procps passwd sudo gpg gpg-agent debootstrap systemd-container systemd dpkg-dev postgresql chromium chromium-driver bubblewrap)
missing=()
for deb in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/python -m tests.support.rootfs  # nspawn test hosts' cached root, if missing
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (pytest-xdist), a test file per worker at a time so that module fixtures are
# made once: most tests wait on processes, sockets and test hosts rather than on a core.
# TEST_WORKERS=0 runs in this process (to debug); the slowest tests are listed at the end,
# to keep the suite within its time budget.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
