"""The two validated configs: the host config (the operator's) and the repo manifest.

Both are read in two stages: YAML to nodes with line marks (`yamlnodes`), then
validation into frozen dataclasses. Every error is a `ConfigError` naming the file,
line and key; `ConfigValidationError.errors` lists all of them for one file.
"""

from agent.config.durations import format_duration, parse_duration
from agent.config.graph import find_cycles, format_cycle, topological_order
from agent.config.host import (
    CONFIG_ENV_VAR,
    DEFAULT_HOST_CONFIG_PATH,
    DestroyPolicy,
    HostConfig,
    Intervals,
    Policy,
    RepoConfig,
    TerraformConfig,
    load_host_config,
    parse_host_config,
    resolve_host_config_path,
)
from agent.config.manifest import (
    MANIFEST_FILENAME,
    DriftPolicy,
    Manifest,
    ManifestCache,
    ManifestLimits,
    StackOutputRef,
    Unit,
    VarValue,
    load_manifest,
    parse_manifest,
)
from agent.config.yamlnodes import ConfigValidationError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_HOST_CONFIG_PATH",
    "MANIFEST_FILENAME",
    "ConfigValidationError",
    "DestroyPolicy",
    "DriftPolicy",
    "HostConfig",
    "Intervals",
    "Manifest",
    "ManifestCache",
    "ManifestLimits",
    "Policy",
    "RepoConfig",
    "StackOutputRef",
    "TerraformConfig",
    "Unit",
    "VarValue",
    "find_cycles",
    "format_cycle",
    "format_duration",
    "load_host_config",
    "load_manifest",
    "parse_duration",
    "parse_host_config",
    "parse_manifest",
    "resolve_host_config_path",
    "topological_order",
]
