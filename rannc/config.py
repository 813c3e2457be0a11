"""Typed configuration: RaNNC's items with RaNNC's defaults, read from a TOML file and RANNC_* variables.

One `RannConfig` object is built at start-up and validated there, so that a typo in an item name or a bad
value stops the run before any work is done, with a message that names the item.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

ENV_PREFIX = "RANNC_"
CONF_FILE_NAME = "rannc_conf.toml"


class ConfigError(ValueError):
    """A configuration item is unknown or its value is invalid."""


@dataclasses.dataclass
class RannConfig:
    """Every item, its default and a one-line help (the metadata 'help')."""

    mem_limit_gb: float = dataclasses.field(
        default=0.0, metadata={"help": "device memory to plan for, in GB; 0 = the device's own memory"})
    mem_margin: float = dataclasses.field(
        default=0.1, metadata={"help": "fraction of device memory kept free for the allocator and workspaces"})
    save_deployment: bool = dataclasses.field(
        default=False, metadata={"help": "save the chosen deployment to deployment_file"})
    load_deployment: bool = dataclasses.field(
        default=False, metadata={"help": "reuse the deployment in deployment_file instead of planning"})
    deployment_file: str = dataclasses.field(
        default="rannc_deployment.json", metadata={"help": "path of the saved deployment"})
    partition_num: int = dataclasses.field(
        default=0, metadata={"help": "force this number of pipeline stages; 0 = let the planner choose"})
    min_pipeline: int = dataclasses.field(
        default=1, metadata={"help": "smallest number of micro-batches the planner considers"})
    max_pipeline: int = dataclasses.field(
        default=32, metadata={"help": "largest number of micro-batches the planner considers"})
    opt_param_factor: int = dataclasses.field(
        default=2, metadata={"help": "optimizer state tensors per parameter (Adam and LAMB: 2)"})
    trace_events: bool = dataclasses.field(
        default=False, metadata={"help": "record a Chrome trace of the pipeline schedule"})
    event_trace_file: str = dataclasses.field(
        default="rannc_event_trace.json", metadata={"help": "where trace_events writes its trace"})
    profile_by_acc: bool = dataclasses.field(
        default=False, metadata={"help": "profile only the smallest micro-batch sizes and extrapolate to larger ones"})
    partitioning_dry_run_np: int = dataclasses.field(
        default=0, metadata={"help": "plan for this many devices, print the plan and exit without training"})
    # Our own items.
    schedule: str = dataclasses.field(
        default="gpipe", metadata={"help": "pipeline schedule: gpipe (forwards in the call, backwards in "
                                           "loss.backward()) or 1f1b (interleaved, fewer micro-batches in flight)"})
    recompute: str = dataclasses.field(
        default="auto", metadata={"help": "activation recomputation per stage: auto (where memory needs it), "
                                          "always, never"})
    max_blocks: int = dataclasses.field(
        default=128, metadata={"help": "at most this many blocks are planned over (coarsening target)"})
    profile_cache_dir: str = dataclasses.field(
        default="~/.cache/rannc", metadata={"help": "folder of cached block profiles; empty = no cache"})
    profile_repeats: int = dataclasses.field(
        default=3, metadata={"help": "timed repetitions per block and micro-batch size"})
    comm_timeout_s: float = dataclasses.field(
        default=1800.0, metadata={"help": "seconds any collective or p2p transfer may wait before failing"})
    verbose: bool = dataclasses.field(
        default=True, metadata={"help": "log the flow and the plan on rank 0"})

    @classmethod
    def item_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **items: Any) -> "RannConfig":
        """A copy with some items changed; names and values are validated like file items."""
        merged = dataclasses.asdict(self)
        for name, value in items.items():
            key = _check_name(name, "argument")
            merged[key] = _coerce(key, value, "argument")
        return RannConfig(**merged)


_FIELDS = {f.name: f for f in dataclasses.fields(RannConfig)}


def _check_name(name: str, source: str) -> str:
    key = name.lower()
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown rannc config item '{name}' (from {source}){hint}")
    return key


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a TOML or environment value to the item's type, or fail naming the item."""
    kind = type(_FIELDS[name].default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, (int, float)) and value in (0, 1):
                out = bool(value)
            elif isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false",
                                                                        "no", "off"):
                out = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError("expected true or false")
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            out = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            out = float(value)
        else:
            out = str(value)
    except ValueError as exc:
        raise ConfigError(f"rannc config item '{name}' (from {source}) has bad value {value!r}: {exc}") from None
    _check_range(name, out, source)
    return out


def _check_range(name: str, value: Any, source: str) -> None:
    bad = None
    if name in ("mem_limit_gb", "comm_timeout_s") and value < 0:
        bad = "must be >= 0"
    elif name == "mem_margin" and not 0.0 <= value < 1.0:
        bad = "must be in [0, 1)"
    elif name in ("partition_num", "partitioning_dry_run_np") and value < 0:
        bad = "must be >= 0"
    elif name in ("min_pipeline", "max_pipeline", "opt_param_factor", "max_blocks", "profile_repeats") and (
            value < (0 if name == "opt_param_factor" else 1)):
        bad = "is too small"
    elif name == "schedule" and value not in ("gpipe", "1f1b"):
        bad = "must be one of gpipe, 1f1b"
    elif name == "recompute" and value not in ("auto", "always", "never"):
        bad = "must be one of auto, always, never"
    if bad:
        raise ConfigError(f"rannc config item '{name}' (from {source}) {bad} (got {value!r})")


def conf_dir() -> Path:
    return Path(os.environ.get("RANNC_CONF_DIR", "~/.pyrannc")).expanduser()


def load_config(env: dict[str, str] | None = None) -> RannConfig:
    """Defaults, then the TOML file, then RANNC_<ITEM> variables (later wins)."""
    env = dict(os.environ if env is None else env)
    items: dict[str, Any] = {}
    path = Path(env.get("RANNC_CONF_DIR", "~/.pyrannc")).expanduser() / CONF_FILE_NAME
    if path.is_file():
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"cannot parse {path}: {exc}") from None
        for name, value in table.items():
            key = _check_name(name, str(path))
            items[key] = _coerce(key, value, str(path))
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == "RANNC_CONF_DIR":
            continue
        key = _check_name(var[len(ENV_PREFIX):], f"environment variable {var}")
        items[key] = _coerce(key, value, f"environment variable {var}")
    config = RannConfig(**items)
    if config.min_pipeline > config.max_pipeline:
        raise ConfigError(f"rannc config item 'min_pipeline' ({config.min_pipeline}) exceeds 'max_pipeline' "
                          f"({config.max_pipeline})")
    return config
