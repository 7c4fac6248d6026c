"""Where things live in the state directory (one place, so nothing guesses a path).

<state_dir>/              0700
  agent.db                the run store (SQLite, WAL)
  agent.db.created        the store existed: losing agent.db is an error (agent.state.storefile)
  agent.db.backup         its backup, refreshed after each pass and suspend/resume
  agent.db.reserve        room to record a pass's end when the disk fills up
  pass.lock               one pass at a time
  children/<token>.json   a Terraform process a pass runs, until it is done (see passlock)
  checkout/               the agent's clone of the infra repo
  checkout.gitconfig      for a local repo: its safe.directory entry (see docs/git-source.md)
  units/<unit>/tfdata/    TF_DATA_DIR of the unit (outside the checkout)
  units/<unit>/terraform.tfstate   local state, for stacks that declare no backend
  runs/<run-id>/<unit>/   init.txt, plan.txt, plan.json, tfplan, apply.txt (0600);
                          a fleet's hosts.txt and held-removals.json
  units/<unit>/hosts/<host>.json   a fleet host's last result (for status); hosts-gone/,
                          desired/ beside it (agent/state/hostrecords.py)
  hosts/<host>.json       what the agent manages on a host, shared by the fleet units
                          (providers/hosts/ledger.py)
                          (the fleet records: with a PostgreSQL store, in the store instead)
  terraform/cli.tfrc      the Terraform CLI config the agent writes
  proposals/              plans of proposed changes (agent/engine/proposals.py): a clone,
                          units/<unit>/, runs/<plan-id>/<unit>/, plugin-cache/, home/,
                          pass.lock (its own: never the pass lock)
  plugin-cache/           shared provider cache (host config terraform.plugin_cache_dir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.core.fsutil import ensure_private_dir


@dataclass(frozen=True, slots=True)
class StateLayout:
    root: Path

    @property
    def checkout(self) -> Path:
        return self.root / "checkout"

    @property
    def children(self) -> Path:
        return self.root / "children"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def cli_config(self) -> Path:
        return self.root / "terraform" / "cli.tfrc"

    @property
    def provider_mirror(self) -> Path:
        return self.root / "terraform" / "providers"

    @property
    def default_plugin_cache(self) -> Path:
        return self.root / "plugin-cache"  # as agent.config.host reads it

    def unit_dir(self, unit: str) -> Path:
        return self.root / "units" / unit

    def unit_data_dir(self, unit: str) -> Path:
        return self.unit_dir(unit) / "tfdata"

    def unit_state_file(self, unit: str) -> Path:
        return self.unit_dir(unit) / "terraform.tfstate"

    def host_record(self, host: str) -> Path:
        """What the agent manages on fleet host `host` (every unit's, one file)."""
        return self.root / "hosts" / f"{host}.json"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def unit_run_dir(self, run_id: str, unit: str) -> Path:
        return self.run_dir(run_id) / unit

    def prepare(self) -> None:
        """Create the private directories the agent writes into."""
        for path in (self.root, self.runs, self.root / "units", self.root / "terraform"):
            ensure_private_dir(path)
