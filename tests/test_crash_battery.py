"""The crash battery: `agent reconcile --now` and `agent run` killed (SIGKILL) and stopped
(SIGTERM) at random points of a pass that applies, then checked (see tests/support/crashlab.py):
nothing of the dead pass alive, the next pass succeeds, no pass lock and no Terraform lock
left, the store readable with no run left `running`, the managed file right.

Real agent processes, the embedded Terraform, real signals; no mocks. The kill points are
random (a delay after the launch, the start of the plan or the start of the apply) but
seeded: the seed is printed, and `CRASH_SEED=N` replays a run. Four labs run side by side
(each its own repo and state dir) to keep the whole short; the on-demand version with
hundreds of kills is bench/crash_battery.py.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.crashlab import CrashLab, Episode, plan_episodes

# Enough to cut a pass in each phase most runs; hundreds: bench/crash_battery.py.
KILLS = 12
TERMS = 6
LABS = 4
SPAN = (0.0, 1.5)  # seconds after the anchor (launch, plan started, apply started)


def run_battery(root: Path, seed: int, kills: int, terms: int, labs: int) -> list[Episode]:
    plan = plan_episodes(seed, kills, terms, SPAN)
    # Half the labs manage the file through the localfile provider (a provider process to
    # leave behind, as in the field), half through a local-exec (cheaper: ~1.5 s of CPU less
    # per pass).
    made = [CrashLab(root / f"lab{i}", sleep=0.5, provider=i % 2 == 0) for i in range(labs)]
    try:
        with ThreadPoolExecutor(labs) as pool:
            list(pool.map(CrashLab.converge, made))

            def work(index: int) -> list[Episode]:
                lab = made[index]
                mine = list(enumerate(plan))[index::labs]
                return [lab.episode(n, mode, anchor, delay) for n, (mode, anchor, delay) in mine]

            results = [e for chunk in pool.map(work, range(labs)) for e in chunk]
    finally:
        for lab in made:
            lab.close()
    return sorted(results, key=lambda e: e.number)


def test_kill_and_term_at_random_points_leave_nothing_behind(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash battery seed {seed} (replay: CRASH_SEED={seed})")
    episodes = run_battery(tmp_path, seed, KILLS, TERMS, LABS)

    assert sum(e.mode.endswith("kill") for e in episodes) >= KILLS
    assert sum(e.mode.endswith("term") for e in episodes) >= TERMS
    phases = {p: sum(e.phase == p for e in episodes) for p in ("start", "plan", "apply", "done")}
    print(f"cut in: {phases}")
    failed = [f"{e.describe()}: {'; '.join(e.problems)}" for e in episodes if e.problems]
    assert not failed, f"seed {seed}:\n" + "\n".join(failed)
