"""The run store on each of its backends, for tests that hold for both.

    from tests.support.stores import open_store, postgres_cluster  # noqa: F401 (fixtures)

    def test_x(open_store):
        store = open_store()           # SQLite in tmp_path, or a fresh PostgreSQL database
        again = open_store()           # the same store, opened a second time

The PostgreSQL cluster is one per test session; each test gets a database of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.state.store import RunStore
from tests.support.postgres import PostgresCluster, server_bin

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    if server_bin() is None:
        pytest.skip("no PostgreSQL server installed (tests/run.sh installs it)")
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., RunStore]]:
    """Opens the test's store (kwargs go to RunStore); every store opened is closed."""
    url = None
    if request.param == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.create_database(f"store_{next(_numbers)}")
    opened: list[RunStore] = []

    def open_(**kwargs: object) -> RunStore:
        store = RunStore(tmp_path / "state", url=url, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
