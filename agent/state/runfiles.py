"""A unit run's files (logs, plans, host reports) readable from every agent that shares a
PostgreSQL run store (docs/store.md, "Logs and plan files").

Each unit run writes its files to `runs/<run>/<unit>/` in the state directory of the agent
that ran it. With a PostgreSQL store, the files are also copied into the store's
`run_files` table when the unit's result is recorded: the same bytes as on disk (the text
was redacted on its way to disk), so `agent logs`, the web pages and `agent approve` on
another agent find them there. Readers look on the local disk first, then in the store.
A SQLite store is one host's: nothing is copied, the files stay on disk only.

The saved Terraform plan of a held unit (`tfplan`) is copied too, as Terraform wrote it: it
is what lets `agent approve` on agent B apply a plan held on agent A. It holds the values
of the plan's variables (as the Terraform state does): the database must be guarded as the
state backend is. Like the file on disk, it is dropped once approved or superseded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from agent.core.fsutil import atomic_write, ensure_private_dir
from agent.state.layout import StateLayout
from agent.state.store import RunStatus, RunStore

log = logging.getLogger(__name__)

__all__ = ["HELD_NAMES", "MAX_FILE_BYTES", "SHARED_NAMES", "RunFiles"]

# What a unit run leaves in its directory (agent.units.stacks and agent.units.fleets):
# the logs, the redacted plan JSON, a fleet's host report and per-host counts, and what a
# held unit saved for approval (a stack's Terraform plan, a fleet's removals).
TEXT_NAMES = ("init.txt", "plan.txt", "policy.txt", "apply.txt", "hosts.txt")
HELD_NAMES = ("tfplan", "held-removals.json")
SHARED_NAMES = (*TEXT_NAMES, "plan.json", "hosts.json", *HELD_NAMES)

# Per file. A longer log is stored cut, with a line that says so; a longer JSON or plan
# file (useless cut) is not stored: it is read on the agent that ran the unit only.
MAX_FILE_BYTES = 16 * 1024 * 1024
# How many of an agent's newest interrupted runs are looked at for files left on its disk.
RECENT_INTERRUPTED = 20


def _cut(name: str, data: bytes, where: str) -> bytes | None:
    if len(data) <= MAX_FILE_BYTES:
        return data
    if name not in TEXT_NAMES:
        log.warning("%s (%d bytes) is over the store's cap: kept on disk only", where, len(data))
        return None
    marker = (
        f"\n... (cut at {MAX_FILE_BYTES // (1024 * 1024)} MiB: the whole file is {where}"
        " on the agent that ran the unit)\n"
    ).encode()
    return data[: MAX_FILE_BYTES - len(marker)] + marker


class RunFiles:
    """The files of unit runs: on this agent's disk, and in a PostgreSQL store."""

    def __init__(
        self, store: RunStore, layout: StateLayout | None = None, *, runs_dir: Path | None = None
    ) -> None:
        """`runs_dir`: where the run folders are (default `runs/`; a proposal's plans are
        under `proposals/runs/<plan-id>/`, kept under the plan id)."""
        self.store = store
        self.layout = layout or StateLayout(store.state_dir)
        self.runs_dir = runs_dir or self.layout.runs
        # Only a PostgreSQL store is shared; a SQLite store keeps nothing of these.
        self.shared = store.postgres

    def _folder(self, run_id: str, unit: str) -> Path:
        return self.runs_dir / run_id / unit

    def _path(self, run_id: str, unit: str, name: str) -> str:
        return str(self._folder(run_id, unit) / name)

    # --- writing (the agent that ran the unit) ------------------------------------------

    def save_unit(self, run_id: str, unit: str, names: Sequence[str] = SHARED_NAMES) -> None:
        """Copy the unit run's files (`names`) from disk into the store (before its result
        is recorded, so that a result seen by any agent has its files). A held file saved
        here supersedes those of the unit's earlier runs, as on disk."""
        if not self.shared:
            return
        folder = self._folder(run_id, unit)
        rows: list[tuple[str, bytes, int]] = []
        for name in names:
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                continue
            kept = _cut(name, data, self._path(run_id, unit, name))
            if kept is not None:
                rows.append((name, kept, len(data)))
        if not rows:
            return
        now = time.time()
        held = [name for name, _, _ in rows if name in HELD_NAMES]
        with self.store.transaction() as db:
            if held:
                db.execute(
                    "DELETE FROM run_files WHERE unit = ? AND run_id <> ? AND name IN (?, ?)",
                    (unit, run_id, *HELD_NAMES),
                )
            db.executemany(
                "INSERT INTO run_files (run_id, unit, name, size, content, stored_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, unit, name) DO UPDATE SET"
                " size = excluded.size, content = excluded.content,"
                " stored_at = excluded.stored_at",
                [(run_id, unit, name, size, data, now) for name, data, size in rows],
            )

    def interrupted_here(self) -> dict[str, list[str]]:
        """This agent's newest interrupted runs (whichever agent marked them) that left unit
        folders on this disk the store has no file of: a killed pass's units never reached
        the copy made when a result is recorded. By run: the units' names."""
        if not self.shared:
            return {}
        rows = self.store.query(
            "SELECT id FROM runs WHERE status = ? AND agent = ? ORDER BY started_at DESC LIMIT ?",
            (RunStatus.INTERRUPTED, self.store.agent, RECENT_INTERRUPTED),
        )
        local = {
            str(r[0]): sorted(p.name for p in (self.runs_dir / str(r[0])).iterdir() if p.is_dir())
            for r in rows
            if (self.runs_dir / str(r[0])).is_dir()
        }
        if not local:
            return {}
        marks = ", ".join("?" for _ in local)
        stored = {
            (str(r[0]), str(r[1]))
            for r in self.store.query(
                f"SELECT DISTINCT run_id, unit FROM run_files WHERE run_id IN ({marks})",
                tuple(local),
            )
        }
        missing = {
            run: [unit for unit in units if (run, unit) not in stored]
            for run, units in local.items()
        }
        return {run: units for run, units in missing.items() if units}

    def save_interrupted(self, run_id: str, units: Sequence[str]) -> None:
        """Copy what a killed pass left on this disk for `units` of run `run_id` (logs,
        plan JSON, host reports; its cut logs closed first) into the store. Never a held
        file: an interrupted unit holds nothing to approve, and its file must not
        supersede an older hold."""
        kept = [name for name in SHARED_NAMES if name not in HELD_NAMES]
        for unit in units:
            self.save_unit(run_id, unit, kept)

    def drop_held(self, unit: str, run_id: str | None = None) -> None:
        """Forget what `unit` held for approval (in `run_id`, or in any run): approved,
        or the unit is back in the repository."""
        if not self.shared:
            return
        with self.store.transaction() as db:
            if run_id is None:
                db.execute(
                    "DELETE FROM run_files WHERE unit = ? AND name IN (?, ?)", (unit, *HELD_NAMES)
                )
            else:
                db.execute(
                    "DELETE FROM run_files WHERE run_id = ? AND unit = ? AND name IN (?, ?)",
                    (run_id, unit, *HELD_NAMES),
                )

    def drop_consumed(self, run_id: str, held: Mapping[str, Path]) -> None:
        """After `agent approve` of run `run_id`: forget the held files that the apply
        consumed (`held`: each unit's file on disk, removed once Terraform tried it)."""
        for unit, path in held.items():
            if not path.exists():
                self.drop_held(unit, run_id)

    def forget_run(self, run_id: str) -> None:
        """Forget every file of a run (the run leaves the history)."""
        if self.shared:
            with self.store.transaction() as db:
                db.execute("DELETE FROM run_files WHERE run_id = ?", (run_id,))

    # --- reading (any agent) ----------------------------------------------------------

    def read(self, run_id: str, unit: str, name: str) -> bytes | None:
        """The file from this agent's disk, else from the store; None if neither has it."""
        try:
            return (self._folder(run_id, unit) / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            pass
        if not self.shared:
            return None
        row = self.store.query(
            "SELECT content FROM run_files WHERE run_id = ? AND unit = ? AND name = ?",
            (run_id, unit, name),
        )
        return bytes(row[0][0]) if row else None

    def read_text(self, run_id: str, unit: str, name: str) -> str | None:
        data = self.read(run_id, unit, name)
        return None if data is None else data.decode("utf-8", errors="replace")

    def names(self, run_id: str, unit: str) -> set[str]:
        """Which of the shared files the unit run has, on disk or in the store."""
        folder = self._folder(run_id, unit)
        found = {name for name in SHARED_NAMES if (folder / name).is_file()}
        if self.shared:
            rows = self.store.query(
                "SELECT name FROM run_files WHERE run_id = ? AND unit = ?", (run_id, unit)
            )
            found.update(str(r[0]) for r in rows)
        return found

    def first_with(self, unit: str, run_ids: Sequence[str], names: Iterable[str]) -> str | None:
        """The first of `run_ids` that left one of `names` for `unit` (the store is asked
        once for the whole list; the disk run by run, stopping at the first)."""
        wanted = tuple(names)
        stored: set[str] = set()
        if self.shared and run_ids:
            marks = ", ".join("?" for _ in run_ids)
            kinds = ", ".join("?" for _ in wanted)
            rows = self.store.query(
                f"SELECT DISTINCT run_id FROM run_files WHERE unit = ? AND run_id IN ({marks})"
                f" AND name IN ({kinds})",
                (unit, *run_ids, *wanted),
            )
            stored = {str(r[0]) for r in rows}
        for run_id in run_ids:
            folder = self._folder(run_id, unit)
            if run_id in stored or any((folder / name).is_file() for name in wanted):
                return run_id
        return None

    def still_held(self, run_id: str, unit: str) -> bool:
        """Whether what `unit` held in `run_id` may still be approved: kept in a shared
        store (an apply on any agent, or a newer hold, drops it), else on this disk."""
        if self.shared:
            rows = self.store.query(
                "SELECT 1 FROM run_files WHERE run_id = ? AND unit = ? AND name IN (?, ?)",
                (run_id, unit, *HELD_NAMES),
            )
            return bool(rows)
        return any((self._folder(run_id, unit) / name).exists() for name in HELD_NAMES)

    def restore(self, run_id: str, unit: str) -> list[str]:
        """Bring the unit run's files this agent's disk lacks back from the store (0600),
        e.g. a plan held on another agent, for `agent approve` here. Returns their names."""
        if not self.shared:
            return []
        folder = self._folder(run_id, unit)
        rows = self.store.query(
            "SELECT name, content FROM run_files WHERE run_id = ? AND unit = ?", (run_id, unit)
        )
        restored = []
        for name, content in ((str(r[0]), bytes(r[1])) for r in rows):
            if name in SHARED_NAMES and not (folder / name).exists():
                ensure_private_dir(folder)
                atomic_write(folder / name, content)
                restored.append(name)
        return restored
