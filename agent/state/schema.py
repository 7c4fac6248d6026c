"""The run store's schema: its migration steps, in order, one transaction each.

A store records how many it has had (SQLite: `PRAGMA user_version`; PostgreSQL: the
`gitops_agent_schema` table, agent/state/pgconn.py). New steps go at the end; each must
run on SQLite and PostgreSQL alike (pgconn.py translates REAL and `?` placeholders; no
INSERT OR REPLACE: DELETE + INSERT, or ON CONFLICT).
"""

from __future__ import annotations

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    trigger TEXT NOT NULL,
    dry_run INTEGER NOT NULL DEFAULT 0,
    unit_filter TEXT,
    revision TEXT,
    head_revision TEXT,
    status TEXT NOT NULL,
    error TEXT,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS unit_runs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    unit TEXT NOT NULL,
    revision TEXT,
    status TEXT NOT NULL,
    decision TEXT,
    drift INTEGER NOT NULL DEFAULT 0,
    plan_add INTEGER,
    plan_change INTEGER,
    plan_destroy INTEGER,
    started_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    PRIMARY KEY (run_id, unit)
);
CREATE INDEX IF NOT EXISTS unit_runs_by_unit ON unit_runs (unit, started_at);
CREATE TABLE IF NOT EXISTS revisions (
    sha TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    error TEXT,
    seen_at REAL NOT NULL,
    run_id TEXT
);
CREATE TABLE IF NOT EXISTS unit_state (
    unit TEXT PRIMARY KEY,
    revision TEXT,
    converged_at REAL,
    last_run_id TEXT,
    last_status TEXT,
    last_decision TEXT,
    drift INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_state (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS suspended_units (
    unit TEXT PRIMARY KEY,
    since REAL NOT NULL,
    by TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS approvals (
    run_id TEXT NOT NULL,
    held_run_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    approved_at REAL NOT NULL,
    by TEXT,
    PRIMARY KEY (run_id, unit)
);
"""

# Columns of the per-unit input fingerprint and of previews (issue 11, 13): a dry run's
# result is recorded beside the real ones, never read as one.
_SCHEMA_V2 = """
ALTER TABLE unit_runs ADD COLUMN preview INTEGER NOT NULL DEFAULT 0;
ALTER TABLE unit_runs ADD COLUMN moved TEXT;  -- the kinds of input that moved (comma-separated)
ALTER TABLE unit_runs ADD COLUMN drift_overwritten INTEGER NOT NULL DEFAULT 0;
ALTER TABLE unit_state ADD COLUMN fingerprint TEXT;  -- the input fingerprint at the last converge
ALTER TABLE unit_state ADD COLUMN preview_run_id TEXT;
ALTER TABLE unit_state ADD COLUMN preview_status TEXT;
ALTER TABLE unit_state ADD COLUMN preview_decision TEXT;
ALTER TABLE unit_state ADD COLUMN preview_at REAL;
"""

# Indexes for the web page (issue 21): the newest passes, and drift events by time, read
# without scanning a long history.
_SCHEMA_V3 = """
CREATE INDEX IF NOT EXISTS runs_by_start ON runs (started_at);
CREATE INDEX IF NOT EXISTS unit_runs_drift ON unit_runs (started_at, unit) WHERE drift = 1;
"""

# Changed-only passes (issue 18): when a plan last looked at the unit (its drift check is
# due from there), and the last pass that found its inputs unchanged and ran nothing. That
# pass leaves the last real result as it was.
_SCHEMA_CHANGED_ONLY = """
ALTER TABLE unit_state ADD COLUMN planned_at REAL;
ALTER TABLE unit_state ADD COLUMN unchanged_run_id TEXT;
ALTER TABLE unit_state ADD COLUMN unchanged_at REAL;
"""

# Plans of proposed changes (issue 17): one row per proposal ref and per unit it affected,
# for the head last planned. Kept apart from runs: a proposal plan is never a pass.
_SCHEMA_PROPOSALS = """
CREATE TABLE IF NOT EXISTS proposals (
    ref TEXT PRIMARY KEY,
    head TEXT NOT NULL,
    base TEXT,
    author TEXT,
    status TEXT NOT NULL,
    detail TEXT,
    plan_id TEXT,
    seen_at REAL NOT NULL,
    planned_at REAL
);
CREATE TABLE IF NOT EXISTS proposal_units (
    ref TEXT NOT NULL,
    unit TEXT NOT NULL,
    head TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    status TEXT NOT NULL,
    plan_add INTEGER,
    plan_change INTEGER,
    plan_destroy INTEGER,
    detail TEXT,
    finished_at REAL NOT NULL,
    PRIMARY KEY (ref, unit)
);
"""

# The input fingerprint each unit run planned with: approving a held plan converges the
# unit to the inputs that plan was made from (issue 13).
_SCHEMA_RUN_FINGERPRINT = """
ALTER TABLE unit_runs ADD COLUMN fingerprint TEXT;
"""

# Units the repository removed (docs/policy.md, "Prune"): where each stands, and the
# revision whose definition its removal uses. A row leaves only when the unit comes back.
_SCHEMA_REMOVED_UNITS = """
CREATE TABLE IF NOT EXISTS removed_units (
    unit TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- stack | fleet
    defined_at TEXT NOT NULL,      -- the revision whose definition the removal uses
    removed_at TEXT NOT NULL,      -- the first revision in force without it
    since REAL NOT NULL,
    policy TEXT NOT NULL,          -- policy.prune when it was found removed
    status TEXT NOT NULL,          -- pruning | held | orphaned | pruned
    run_id TEXT,                   -- the last run that acted on it
    error TEXT,
    updated_at REAL NOT NULL
);
"""

# A unit run's files, for every agent of a shared PostgreSQL store (agent/state/runfiles.py).
_SCHEMA_RUN_FILES = """
CREATE TABLE IF NOT EXISTS run_files (
    run_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,         -- bytes on disk (content may be cut to the cap)
    content BLOB NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (run_id, unit, name)
);
"""

# Scale-out mode (docs/scale-out.md): the agents sharing a PostgreSQL store, the unit
# leases, and which agent ran each pass (agent/state/cluster.py).
_SCHEMA_CLUSTER = """
CREATE TABLE IF NOT EXISTS cluster_agents (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,          -- JSON object
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,    -- the database's clock, as every lease time
    draining INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    host TEXT
);
CREATE TABLE IF NOT EXISTS unit_leases (
    unit TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    token INTEGER NOT NULL,        -- fencing token: one more on every change of holder
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL       -- released: set to the release time (the row stays)
);
ALTER TABLE runs ADD COLUMN agent TEXT;
"""

# A fleet's per-host records when the store is shared (agent/state/hostrecords.py): what
# the agent manages on each host (`kind` ledger, `unit` ''), each unit's last result per
# host (result, gone) and what it last converged there (desired). JSON bodies.
_SCHEMA_HOST_RECORDS = """
CREATE TABLE IF NOT EXISTS host_records (
    kind TEXT NOT NULL,            -- ledger | result | gone | desired
    unit TEXT NOT NULL,            -- '' for the ledger (one per host, every unit's)
    host TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (kind, unit, host)
);
"""

# What every agent of a cluster must share, recorded by each (agent/engine/agreement.py),
# and the TTL a lease was taken with: a lease runs out by its holder's TTL, not a reader's.
_SCHEMA_CLUSTER_SETTINGS = """
ALTER TABLE cluster_agents ADD COLUMN lease_ttl REAL;
ALTER TABLE cluster_agents ADD COLUMN affinity_hash TEXT;
ALTER TABLE cluster_agents ADD COLUMN sharding_version INTEGER;
ALTER TABLE unit_leases ADD COLUMN ttl REAL;
"""

# The schema's history: step i takes a store from `user_version` i to i + 1 (in one
# transaction). Add a step at the end to change the schema; never edit a shipped one.
MIGRATIONS: list[str] = [
    _SCHEMA_V1,
    _SCHEMA_V2,
    _SCHEMA_V3,
    _SCHEMA_CHANGED_ONLY,
    _SCHEMA_PROPOSALS,
    _SCHEMA_RUN_FINGERPRINT,
    _SCHEMA_REMOVED_UNITS,
    _SCHEMA_RUN_FILES,
    _SCHEMA_CLUSTER,
    _SCHEMA_HOST_RECORDS,
    _SCHEMA_CLUSTER_SETTINGS,
]
SCHEMA_VERSION = len(MIGRATIONS)
