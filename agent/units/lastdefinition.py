"""A removed unit's last definition: the revision that last defined it, exported apart from
the checkout (`units/<unit>/removed/`), its manifest read under this host config, and the
unit ready to run there (a stack with its secrets; a fleet in the current pass's context,
its hosts taken from what it recorded). agent/units/prune.py decides what to do with it."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from agent.config import HostConfig, Manifest, ManifestLimits, Unit, load_manifest
from agent.config.fleet import HostSpec
from agent.errors import ConfigError, PruneError
from agent.policy.prune import PruneMode
from agent.state.hostrecords import LEDGER, RESULT, HostRecords
from agent.state.layout import StateLayout
from agent.state.store import RemovedUnitRow
from agent.units.context import StackContext
from agent.units.secrets import SecretResolver
from providers.errors import GitSourceError
from providers.git_source import GitSource

log = logging.getLogger(__name__)

EXPORT_DIR = "removed"  # units/<unit>/removed: the export of its last definition


@dataclass(frozen=True, slots=True)
class PruneRequest:
    """What the pass hands the prune step."""

    run_id: str
    revision: str  # the revision in force for this pass
    manifest: Manifest  # its manifest
    override_window: str | None = None
    dry_run: bool = False  # preview only: plan, record nothing but the preview


@dataclass(frozen=True, slots=True)
class Definition:
    """A removed unit as its last revision defined it, ready to run."""

    ctx: StackContext
    unit: Unit


class LastDefinitions:
    """The exports and last definitions of removed units; one per Pruner."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        source: GitSource,
        secrets: SecretResolver,
        records: HostRecords,
    ) -> None:
        """`records`: the fleets' host records (a removed fleet's hosts are found there)."""
        self.host = host
        self.layout = layout
        self.records = records
        self.source = source
        self.secrets = secrets

    def drop_export(self, name: str) -> None:
        where = self.layout.unit_dir(name) / EXPORT_DIR
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
            log.info("%s: the export of its last definition was removed", name)

    def definition(
        self, request: PruneRequest, row: RemovedUnitRow, *, secrets: bool = True
    ) -> Definition:
        """The unit as it was last defined, with a context to run it in: a stack runs in
        an export of that revision with its secrets; a fleet runs in the current pass's
        context (what other units own now must not be removed), its hosts taken from
        what it recorded."""
        manifest = self.manifest(row)
        unit = manifest.get_unit(row.unit)
        if unit is None:
            raise PruneError(
                f"{row.unit}: its last definition is not known (not in gitops.yaml at"
                f" {row.defined_at[:12]}); nothing was removed",
                hint="add the unit back to gitops.yaml, or `agent suspend` it to leave it",
            )
        if unit.fleet is None:
            resolved = self.secrets.resolve([unit] if secrets else [])
            if row.unit in resolved.errors:
                raise PruneError(resolved.errors[row.unit])
            ctx = StackContext(
                run_id=request.run_id,
                revision=request.revision,
                tree=self._tree(row),
                manifest=manifest,
                dry_run=request.dry_run,
                secrets=resolved,
                override_window=request.override_window,
            )
            return Definition(ctx, unit)
        fleet = unit.fleet
        hosts = self._fleet_hosts(unit)
        bare = replace(
            unit,
            depends_on=(),
            vars={},
            secrets={},
            fleet=replace(fleet, hosts=hosts, roles=(), resources=(), vars={}),
        )
        now = request.manifest
        ctx = StackContext(
            run_id=request.run_id,
            revision=request.revision,
            tree=self.layout.checkout,
            manifest=replace(now, units=(*[u for u in now.units if u.name != unit.name], bare)),
            dry_run=request.dry_run,
            override_window=request.override_window,
        )
        return Definition(ctx, bare)

    def _fleet_hosts(self, unit: Unit) -> tuple[HostSpec, ...]:
        """The hosts whose records hold objects of `unit`, addressed as it last saw them."""
        assert unit.fleet is not None
        static = (
            {h.name: h for h in unit.fleet.hosts} if isinstance(unit.fleet.hosts, tuple) else {}
        )
        hosts: list[HostSpec] = []
        for name, record in self.records.all(LEDGER, "").items():
            objects = record.get("objects", {})
            if not any(entry.get("unit") == unit.name for entry in objects.values()):
                continue
            spec = static.get(name)
            if spec is None:
                seen = self.records.read(RESULT, unit.name, name)
                if seen is None or "address" not in seen:
                    log.warning("%s: the address of host %s is not known", unit.name, name)
                    continue
                spec = HostSpec(name=name, address=str(seen["address"]))
            hosts.append(
                HostSpec(name=spec.name, address=spec.address, port=spec.port, user=spec.user)
            )
        return tuple(hosts)

    def _tree(self, row: RemovedUnitRow) -> Path:
        """An export of the revision that defines the removed unit (made once)."""
        where = self.layout.unit_dir(row.unit) / EXPORT_DIR
        marker = where / "revision"
        tree = where / "tree"
        try:
            if marker.read_text() == row.defined_at and tree.is_dir():
                return tree
        except OSError:
            pass
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.source.export(row.defined_at, tree)
        except GitSourceError as exc:
            raise PruneError(f"{row.unit}: cannot read its last definition: {exc}") from exc
        marker.write_text(row.defined_at)
        return tree

    def manifest(self, row: RemovedUnitRow) -> Manifest:
        return self._load(self._tree(row))

    def _load(self, tree: Path) -> Manifest:
        try:
            # Any `prune:` is read: the host's policy.prune bounds it when it is used (the
            # ceiling may have changed since; that must not make the definition unreadable).
            limits = replace(ManifestLimits.from_host(self.host), prune_ceiling=PruneMode.AUTO)
            return load_manifest(tree, limits)
        except ConfigError as exc:
            raise PruneError(
                "the revision that last defined it is not valid under this host config:"
                f" {exc.message}"
            ) from exc
