"""`agent cluster` and `agent drain` (docs/scale-out.md, "Operations")."""

from __future__ import annotations

import time
from typing import Any

from agent.config import HostConfig
from agent.config.cluster import ClusterConfig
from agent.engine.agreement import SETTING_NAMES, agree
from agent.engine.sharding import SHARDING_VERSION, Member, assign
from agent.errors import AgentError, ConfigError
from agent.state.cluster import SETTINGS, ClusterStore, Settings
from agent.state.store import open_run_store

DRAIN_POLL = 1.0  # seconds between looks at a draining agent's leases


def _config(host: HostConfig) -> ClusterConfig:
    if host.cluster is None:
        raise ConfigError(
            f"{host.path}: no `cluster:` in this host config: the agent runs alone",
            hint="see docs/scale-out.md to run several agents on one PostgreSQL store",
        )
    return host.cluster


def cluster_view(host: HostConfig) -> dict[str, Any]:
    """The agents (live or not), which units each owns now, and the leases held."""
    config = _config(host)
    store = open_run_store(host, read_only=True)
    try:
        registry = ClusterStore(store, config.agent, config.lease_ttl)
        agents = registry.agents()
        leases = [lease for lease in registry.leases() if lease.expires_in > 0]
        current = store.current_revision()
        units = sorted({s.unit for s in store.unit_states()} - set(store.removed.by_unit()))
    finally:
        store.close()
    agreement = agree(agents)
    live = [Member.of(a.name, a.labels) for a in agents if a.name in agreement.agreeing]
    owners = assign(units, live, config)
    here = Settings(config.lease_ttl, config.affinity_hash(), SHARDING_VERSION)
    agreed = agreement.settings
    return {
        "agent": config.agent,
        "lease_ttl": config.lease_ttl,
        "revision": current,
        "settings": {
            "agreed": _settings(agreed),
            "reference": agreement.reference,
            "agreeing": list(agreement.agreeing),
            # this host config's own, when it differs (its `agent cluster` shards by it)
            "differs_here": [_mismatch(m) for m in agreement.mismatches(here)],
        },
        "agents": [
            {
                "name": a.name,
                "labels": a.labels,
                "live": a.live,
                "draining": a.draining,
                "refusing": a.name in agreement.refusing,
                "heartbeat_age": round(a.heartbeat_age, 1),
                "pid": a.pid,
                "host": a.host,
                "settings": _settings(a.settings),
                "mismatch": [_mismatch(m) for m in agreement.refusing.get(a.name, ())],
                "units": sorted(u for u, owner in owners.items() if owner == a.name),
            }
            for a in agents
        ],
        "unowned": sorted(u for u, owner in owners.items() if owner is None),
        "leases": [
            {
                "unit": lease.unit,
                "agent": lease.agent,
                "token": lease.token,
                "age": round(lease.age, 1),
                "expires_in": round(lease.expires_in, 1),
                "ttl": lease.ttl,
            }
            for lease in leases
        ],
    }


def _settings(settings: Settings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {
        "lease_ttl": settings.lease_ttl,
        "affinity": settings.affinity,
        "sharding": settings.sharding,
    }


def _mismatch(m: Any) -> dict[str, str]:
    return {"setting": m.setting, "value": m.value, "agreed": m.agreed}


def _state(agent: dict[str, Any]) -> str:
    if agent["draining"]:
        return "draining"
    if not agent["live"]:
        return "dead"
    return "refusing" if agent["refusing"] else "live"


def render_cluster(view: dict[str, Any]) -> str:
    lines = [f"cluster seen from {view['agent']} (lease TTL {view['lease_ttl']:g}s)", ""]
    lines.append(f"{'AGENT':<20} {'STATE':<9} {'HEARTBEAT':>9}  {'LABELS':<24} UNITS")
    for agent in view["agents"]:
        state = _state(agent)
        labels = ",".join(f"{k}={v}" for k, v in sorted(agent["labels"].items())) or "-"
        owned = ", ".join(agent["units"]) or "-"
        lines.append(
            f"{agent['name']:<20} {state:<9} {agent['heartbeat_age']:>8.1f}s  {labels:<24} {owned}"
        )
    lines.extend(_settings_lines(view))
    if view["unowned"]:
        lines.append("")
        lines.append(
            "not run (no live agent matches their affinity): " + ", ".join(view["unowned"])
        )
    lines.append("")
    if not view["leases"]:
        lines.append("no lease held (no unit is being reconciled)")
    else:
        lines.append(f"{'UNIT':<24} {'HELD BY':<20} {'TOKEN':>6} {'AGE':>8} {'EXPIRES IN':>11}")
        for lease in view["leases"]:
            lines.append(
                f"{lease['unit']:<24} {lease['agent']:<20} {lease['token']:>6}"
                f" {lease['age']:>7.1f}s {lease['expires_in']:>10.1f}s"
            )
    return "\n".join(lines)


def _settings_lines(view: dict[str, Any]) -> list[str]:
    """The agreed settings, and a line per setting an agent (or this host config) has
    otherwise: the setting and both values."""
    settings = view["settings"]
    agreed = settings["agreed"]
    if settings["reference"] is None:
        return []
    lines = [""]
    if agreed is None:
        lines.append(f"settings: none recorded (agents {', '.join(settings['agreeing'])})")
    else:
        shown = Settings(agreed["lease_ttl"], agreed["affinity"], agreed["sharding"])
        values = ", ".join(f"{SETTING_NAMES[n]} {shown.describe(n)}" for n in SETTINGS)
        lines.append(
            f"settings agreed by {', '.join(settings['agreeing'])} (the larger group,"
            f" reference {settings['reference']}): {values}"
        )
    for agent in view["agents"]:
        for m in agent["mismatch"]:
            lines.append(
                f"{agent['name']} takes no lease: {SETTING_NAMES[m['setting']]} is"
                f" {m['value']} there, {m['agreed']} agreed"
            )
    for m in settings["differs_here"]:
        lines.append(
            f"this host config ({view['agent']}): {SETTING_NAMES[m['setting']]} is"
            f" {m['value']}, {m['agreed']} agreed"
        )
    return lines


def drain(client: Any, host: HostConfig, *, timeout: float, say: Any) -> dict[str, Any]:
    """Ask the running agent to drain; wait (up to `timeout`) until it holds no lease."""
    from agent.service.control import run_remote

    _config(host)
    deadline = time.monotonic() + timeout
    told = False
    while True:
        answer = run_remote(client, "drain", state_dir=str(host.state_dir))
        if not answer.get("held"):
            return answer
        if time.monotonic() >= deadline:
            raise AgentError(
                f"agent {answer.get('agent')} still holds {', '.join(answer['held'])} after"
                f" {timeout:g}s: its running unit has not finished",
                hint="it is draining and takes no new unit; run `agent drain` again to wait more",
            )
        if not told:
            say(f"draining: waiting for {', '.join(answer['held'])} to finish")
            told = True
        time.sleep(DRAIN_POLL)
