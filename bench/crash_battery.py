"""The crash battery on demand: hundreds of SIGKILLs and SIGTERMs of `agent reconcile --now`
and `agent run` at random points of a pass that applies, each followed by the checks of
tests/support/crashlab.py (nothing of the dead pass alive, the next pass succeeds, no pass
lock or Terraform lock left, store readable, no run left `running`, managed file right).

    .venv/bin/python bench/crash_battery.py --kills 200 --terms 50 [--labs 4] [--seed N]
        [--json /tmp/crash.json] [--no-provider]

Each lab is its own repo, state dir and agent; labs run side by side. The stack uses the
`localfile` provider (a real provider process) unless --no-provider. The seed is printed;
the same seed replays the same modes, anchors and delays. Exit 1 if any episode failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.crashlab import CrashLab, Episode, plan_episodes

SPAN = (0.0, 1.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--terms", type=int, default=50)
    parser.add_argument("--labs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=1.0, help="the local-exec sleep, s")
    parser.add_argument("--no-provider", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}: {args.kills} kills, {args.terms} terms, {args.labs} labs", flush=True)

    plan = plan_episodes(seed, args.kills, args.terms, SPAN)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gitops-crash-") as tmp:
        labs = [
            CrashLab(Path(tmp) / f"lab{i}", sleep=args.sleep, provider=not args.no_provider)
            for i in range(args.labs)
        ]
        try:
            with ThreadPoolExecutor(args.labs) as pool:
                list(pool.map(CrashLab.converge, labs))

                def work(index: int) -> list[Episode]:
                    done = []
                    for number, (mode, anchor, delay) in list(enumerate(plan))[index :: args.labs]:
                        episode = labs[index].episode(number, mode, anchor, delay)
                        mark = "FAIL " + "; ".join(episode.problems) if episode.problems else "ok"
                        print(f"{episode.describe()} cut in {episode.phase}: {mark}", flush=True)
                        done.append(episode)
                    return done

                episodes = sorted(
                    (e for chunk in pool.map(work, range(args.labs)) for e in chunk),
                    key=lambda e: e.number,
                )
        finally:
            for lab in labs:
                lab.close()
    elapsed = time.monotonic() - started

    report = summarize(episodes, seed, elapsed)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**report, "episodes": [asdict(e) for e in episodes]}))
    return 1 if report["failed"] else 0


def summarize(episodes: list[Episode], seed: int, elapsed: float) -> dict[str, object]:
    terms = [e.exit_seconds for e in episodes if e.mode.endswith("term") and e.exit_seconds]
    return {
        "seed": seed,
        "seconds": round(elapsed),
        "episodes": len(episodes),
        "by_mode": dict(collections.Counter(e.mode for e in episodes)),
        "cut_in": dict(collections.Counter(e.phase for e in episodes)),
        "failed": len([e for e in episodes if e.problems]),
        "problems": [f"{e.describe()}: {'; '.join(e.problems)}" for e in episodes if e.problems],
        "next_pass_ended_leftovers": sum(any("dead agent" in s for s in e.swept) for e in episodes),
        "next_pass_cleared_tf_lock": sum(any("state lock" in s for s in e.swept) for e in episodes),
        "term_exit_seconds": {
            "median": round(statistics.median(terms), 2) if terms else None,
            "max": round(max(terms), 2) if terms else None,
        },
        "term_cut_status": dict(
            collections.Counter(str(e.cut_status) for e in episodes if e.mode.endswith("term"))
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
