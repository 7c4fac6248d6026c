"""The web page's server time per page with a big history, and the live latency.

Fills a real run store with 200 units (a manifest of 200 stacks in dependency chains) and
10,000 passes (5 units each, 50,000 unit results), then times `WebApp.render` (the server's
whole work for a page: queries, template, redaction) for the overview, a unit's first and
last page of runs, and the activity page. With `--browser`, also opens the overview in
headless Chromium and measures how long a `unit-finished` event takes from the hub to the
browser (event received) and to the page swapped in (the fetch of the fresh page).

    .venv/bin/python bench/web_pages.py --units 200 --runs 10000 --repeat 50 --browser
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

from agent.config.manifest import DriftPolicy, Manifest, Unit
from agent.config.web import WebConfig
from agent.core.progress import Event, EventKind
from agent.core.redact import Redactor
from agent.state.layout import StateLayout
from agent.state.store import RunStore
from agent.web.events import EventHub
from agent.web.server import WebApp, WebServer

STATUSES = ("ok", "ok", "ok", "ok", "failed", "held", "blocked")


def fill(state: Path, units: int, runs: int) -> None:
    layout = StateLayout(state)
    layout.prepare()
    store = RunStore(state)
    db = store._db  # bulk insert in one transaction: the public API commits per row
    now = time.time() - runs * 60
    with db:
        for i in range(runs):
            run_id = f"r-{i:08d}"
            start = now + i * 60
            db.execute(
                "INSERT INTO runs (id, started_at, finished_at, trigger, status, revision,"
                " head_revision) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, start, start + 5 + i % 17, "poll", "succeeded", "a" * 40, "a" * 40),
            )
            rows = []
            for k in range(5):
                unit = f"unit{(i * 5 + k) % units:03d}"
                status = STATUSES[(i + k) % len(STATUSES)]
                rows.append(
                    (
                        run_id,
                        unit,
                        "a" * 40,
                        status,
                        "apply",
                        int(k == 0),
                        1,
                        0,
                        0,
                        start,
                        start + 3,
                        "error text" if status == "failed" else None,
                    )
                )
            db.executemany(
                "INSERT INTO unit_runs (run_id, unit, revision, status, decision, drift,"
                " plan_add, plan_change, plan_destroy, started_at, finished_at, error)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            for row in rows:
                db.execute(
                    "INSERT OR REPLACE INTO unit_state (unit, revision, converged_at,"
                    " last_run_id, last_status, last_decision, drift, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    (row[1], "a" * 40, start, run_id, row[3], "apply", start),
                )
        db.execute(
            "INSERT OR REPLACE INTO agent_state (key, value) VALUES ('current_revision', ?)",
            ("a" * 40,),
        )
    # The plan output of the newest result of unit000, as Terraform prints it.
    last = db.execute(
        "SELECT run_id FROM unit_runs WHERE unit = 'unit000' ORDER BY started_at DESC LIMIT 1"
    ).fetchone()[0]
    store.close()
    plan = layout.unit_run_dir(last, "unit000")
    plan.mkdir(parents=True, exist_ok=True)
    (plan / "plan.txt").write_text(
        "".join(f'  + resource "terraform_data" "r{n}" {{ input = "{n}" }}\n' for n in range(200))
        + "Plan: 200 to add, 0 to change, 0 to destroy.\n"
    )


def manifest(units: int) -> Manifest:
    """200 stacks in chains of 10: unit k depends on unit k-1 within its chain."""
    made = []
    for k in range(units):
        deps = (f"unit{k - 1:03d}",) if k % 10 else ()
        made.append(
            Unit(
                name=f"unit{k:03d}",
                stack=f"stacks/u{k}",
                depends_on=deps,
                drift=DriftPolicy.REVERT,
                timeout=600.0,
                vars=MappingProxyType({}),
                labels=MappingProxyType({}),
                line=k + 3,
            )
        )
    return Manifest(path=Path("gitops.yaml"), version=1, units=tuple(made))


def time_pages(app: WebApp, units: int, runs: int, repeat: int) -> dict[str, dict[str, float]]:
    per_unit = runs * 5 // units
    last_page = -(-per_unit // 20)
    paths = {
        "overview": ("/", {}),
        "unit, page 1": ("/units/unit000", {}),
        f"unit, page {last_page}": ("/units/unit000", {"page": [str(last_page)]}),
        "activity": ("/activity", {}),
    }
    results = {}
    for name, (path, query) in paths.items():
        status, _, body = app.render(path, query)
        assert status == 200, (name, status, body[:300])
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            app.render(path, query)
            samples.append((time.perf_counter() - started) * 1000)
        samples.sort()
        results[name] = {
            "median_ms": round(statistics.median(samples), 1),
            "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 1),
            "bytes": len(body),
        }
    return results


def live_latency(app: WebApp, hub: EventHub, events: int, profile: Path) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    server = WebServer(app, WebConfig("127.0.0.1", 0))
    server.start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=shutil.which("chromedriver"))
    )
    received, swapped = [], []
    try:
        driver.get(server.url + "/")
        deadline = time.monotonic() + 30
        while driver.find_element("id", "live").text != "live":
            assert time.monotonic() < deadline, "the event stream did not connect"
            time.sleep(0.05)
        for n in range(events):
            before = driver.execute_script("return document.body.dataset.updated || '';")
            sent = time.time()
            hub(Event(EventKind.UNIT_FINISHED, f"r-bench-{n}", "unit000", "applied", 1.0))
            deadline = time.monotonic() + 10
            while True:
                data = driver.execute_script(
                    "return [document.body.dataset.receivedAt || '',"
                    " document.body.dataset.updated || ''];"
                )
                if data[1] and data[1] != before and float(data[0]) >= sent * 1000 - 5:
                    break
                assert time.monotonic() < deadline, "the page did not update"
                time.sleep(0.02)
            received.append(float(data[0]) - sent * 1000)
            swapped.append(float(data[1]) - sent * 1000)
            time.sleep(0.5)
    finally:
        driver.quit()
        server.stop()
    return {
        "event_received_median_ms": round(statistics.median(received), 1),
        "event_received_max_ms": round(max(received), 1),
        "page_updated_median_ms": round(statistics.median(swapped), 1),
        "page_updated_max_ms": round(max(swapped), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--events", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp:
        state = Path(tmp) / "state"
        started = time.perf_counter()
        fill(state, args.units, args.runs)
        filled = time.perf_counter() - started
        redactor = Redactor()
        redactor.register("a-registered-secret-value-123")
        hub = EventHub(redactor.redact)
        hub.manifest = manifest(args.units)
        store = RunStore(state, read_only=True)
        app = WebApp(store, StateLayout(state), redact=redactor.redact, hub=hub)
        report: dict[str, object] = {
            "units": args.units,
            "runs": args.runs,
            "fill_s": round(filled, 1),
            "pages": time_pages(app, args.units, args.runs, args.repeat),
        }
        if args.browser:
            report["live"] = live_latency(app, hub, args.events, Path(tmp) / "profile")
        store.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
