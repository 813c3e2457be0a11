"""Typed configuration: RaNNC's items with RaNNC's defaults, read from a TOML file and RANNC_* variables.

One `RannConfig` object is built at start-up and validated there, so that a typo in an item name or a bad
value stops the run before any work is done, with a message that names the item.

RaNNC's own items that have no meaning here (its undocumented debugging and partitioner switches, listed in
`UPSTREAM_ONLY`) are accepted from every source, so that RaNNC's scripts and launchers run unchanged; each one
logs a single notice per process that it has no effect, naming the closest rannc item where there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from rannc.schedule import names as schedule_names
from rannc.schedule import supports_virtual_stages

ENV_PREFIX = "RANNC_"
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CONF_FILE_NAME = "rannc_conf.toml"

logger = logging.getLogger("rannc.config")

_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}

# RaNNC items (src/Config.cpp) without a meaning in rannc -> the closest rannc item, or None.
UPSTREAM_ONLY: dict[str, str | None] = {
    "profiling": "trace_events", "graph_profiling": None, "profile_dump_path": None,
    "dump_graph": None, "dump_graph_prefix": None,
    "replica_num": None, "pipeline_num": None,
    "validate_comm": None, "display_comm_value": None, "display_act_value": None,
    "consolidate_grads": None, "profiling_iter": "profile_repeats",
    "checkpointing": "recompute", "checkpointing_no_last": "recompute",
    "disable_balancing": None, "auto_parallel": None, "p2p_comm": None, "decomposer": None,
    "min_partition_num": "partition_num", "max_partition_num": "partition_num", "max_mp_num": None,
    "do_coarsening": "max_blocks", "do_uncoarsening": "max_blocks", "coarsen_by_time": "max_blocks",
    "save_graph_profile": "profile_cache_dir", "load_graph_profile": "profile_cache_dir",
    "graph_profile_file": "profile_cache_dir",
    "verify_recomp": None, "verify_partitioning": None, "dp_search_all": None, "min_pipeline_bs": None,
    "limit_dev_num_pot": None, "limit_dev_num_more_than_bs": None, "alloc_repl_flat": None,
    "save_mlpart_results": None, "load_mlpart_results": None, "mlpart_results_file": None,
    "save_alloc_solutions": None, "load_alloc_solutions": None, "alloc_solutions_file_prefix": None,
    "dump_dp_node_profiles": None, "dump_dp_cache": None, "use_mpi_to_gather_dist_params": None,
    "run_watchdog": "comm_timeout_s", "watchdog_lockfile_dir": "comm_timeout_s",
    "force_dist_matmul": None, "use_named_tensors": None,
    "profiler_cache_size": "profile_cache_dir", "enable_kineto": "trace_events", "conf_dir": None,
}
# Extra advice for some of them.
_UPSTREAM_ADVICE = {
    "pipeline_num": "to force the number of micro-batches, set min_pipeline and max_pipeline to the same value",
    "conf_dir": "rannc reads the folder of rannc_conf.toml from the RANNC_CONF_DIR variable",
}
_WARNED: set[str] = set()


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
        default=False, metadata={"help": "reuse the deployment in deployment_file instead of planning; a path "
                                         "(RaNNC's RaNNCModule(load_deployment=path)) also sets deployment_file"})
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
    show_config_items: bool = dataclasses.field(
        default=False, metadata={"help": "log every config item and its value at start (rank 0)"})
    sync_allreduce: bool = dataclasses.field(
        default=False, metadata={"help": "accepted for RaNNC compatibility; rannc's all-reduces always run in "
                                         "the same order on every rank, so it changes nothing"})
    gather_inputs: bool = dataclasses.field(
        default=True, metadata={"help": "RaNNCModule argument: True = the global batch is the union of all "
                                        "ranks' local batches; False: the global batch is rank 0's batch, other "
                                        "ranks' inputs are ignored"})
    # Our own items.
    schedule: str = dataclasses.field(
        default="gpipe", metadata={"help": "pipeline schedule: auto (the planner chooses gpipe, 1f1b or "
                                           "interleaved_1f1b, the simplest unless another is predicted 3% "
                                           "faster), gpipe (forwards "
                                           "in the call, backwards in loss.backward()), 1f1b (fewer "
                                           "micro-batches in flight), "
                                           "interleaved_1f1b (virtual_stages model pieces per rank, a smaller "
                                           "bubble) or zb_h1 (backward split into input and weight gradients, "
                                           "a third of 1F1B's bubble); all but gpipe run the backwards inside "
                                           "the call and need a model returning one scalar loss"})
    virtual_stages: int = dataclasses.field(
        default=1, metadata={"help": "model pieces per pipeline rank (interleaved_1f1b): each rank runs "
                                     "virtual_stages non-adjacent pieces, shrinking the bubble by that factor "
                                     "for as many more transfers"})
    stage_replicas: str = dataclasses.field(
        default="", metadata={"help": "replica count per pipeline stage, e.g. '1,2' (forces that many stages; "
                                      "ranks beyond their sum stay idle); empty: the planner chooses, unequal "
                                      "counts included where the stage count does not divide the processes"})
    recompute: str = dataclasses.field(
        default="auto", metadata={"help": "activation recomputation per stage: auto (where memory needs it), "
                                          "always, never"})
    accumulate_grads: bool = dataclasses.field(
        default=True, metadata={"help": "the planner keeps the gradients' memory through the forward pass "
                                        "(accumulation over several calls); False when every step ends with "
                                        "zero_grad(set_to_none=True), which frees it for activations"})
    plan_grad_clipping: bool = dataclasses.field(
        default=True, metadata={"help": "the planner counts a global gradient clipping in every step"})
    compile: str = dataclasses.field(
        default="auto", metadata={"help": "run every stage's module under torch.compile (inductor): auto (on "
                                          "where the stages run on CUDA devices with Triton, off on CPUs, where "
                                          "inductor's "
                                          "C++ compile takes minutes for little gain), true or false; the runs of "
                                          "blocks the profiler times whole are compiled too, and a recompilation "
                                          "in the steady state is logged as a warning; not with zb_h1 (a "
                                          "compiled stage's backward is one autograd node, which the split "
                                          "backward cannot divide; auto leaves it off there)"})
    param_dtype: str = dataclasses.field(
        default="", metadata={"help": "bfloat16: the model computes with bfloat16 parameters and gradients while "
                                      "the optimizer steps fp32 master weights, which state dicts hold (needs "
                                      "the optimizer given to RaNNCModule); empty: the parameters as they are"})
    compile_mode: str = dataclasses.field(
        default="auto", metadata={"help": "torch.compile's mode for compiled stages: auto (reduce-overhead for "
                                          "stages on CUDA devices that do not recompute, default elsewhere; the "
                                          "profiler's compiled runs of blocks use it too), "
                                          "default, reduce-overhead (CUDA graphs: no host time launching "
                                          "kernels), max-autotune or max-autotune-no-cudagraphs; stages that "
                                          "recompute never replay CUDA graphs"})
    compile_options: str = dataclasses.field(
        default="", metadata={"help": "inductor options for compiled stages, over those of compile_mode: name=value "
                                      "pairs separated by spaces, as torch.compile's options argument takes them "
                                      "(e.g. 'coordinate_descent_tuning=true combo_kernels=true'); the profiler's "
                                      "compiled runs of blocks use them too; CUDA graphs are compile_mode's"})
    compile_regions: bool = dataclasses.field(
        default=True, metadata={"help": "with compile: whole repeated layers of a stage (four or more of one code) "
                                        "compile once, as shared regions (torch.compiler.nested_compile_region), "
                                        "so that compile time does not grow with the layer count; False "
                                        "compiles every layer inline"})
    fuse_linears: bool = dataclasses.field(
        default=True, metadata={"help": "linear layers that read the same input (attention's query, key and "
                                        "value) run as one product over their stacked weights, the same dot "
                                        "products in one wider GEMM (rannc.graph.fuse); the parameters stay "
                                        "the model's own"})
    max_blocks: int = dataclasses.field(
        default=128, metadata={"help": "at most this many blocks are planned over (coarsening target)"})
    profile_cache_dir: str = dataclasses.field(
        default="~/.cache/rannc", metadata={"help": "folder of cached block profiles, link speeds and optimizer "
                                                    "timings; empty = no cache"})
    profile_repeats: int = dataclasses.field(
        default=3, metadata={"help": "timed repetitions per block and micro-batch size"})
    comm_timeout_s: float = dataclasses.field(
        default=600.0, metadata={"help": "seconds any collective or p2p transfer may wait before failing: how long "
                                         "a hung rank goes unnoticed (the first call's planning must fit in it)"})
    verbose: bool = dataclasses.field(
        default=True, metadata={"help": "log the flow and the plan on rank 0"})

    @classmethod
    def item_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def __post_init__(self) -> None:
        # RannConfig(compile=True) built directly: the item's words, as from a file or a variable
        if self.compile not in ("auto", "true", "false"):
            self.compile = _coerce("compile", self.compile, "argument")

    def replace(self, **items: Any) -> "RannConfig":
        """A copy with some items changed; names and values are validated like file items. RaNNC-only items
        are accepted with a notice (see UPSTREAM_ONLY)."""
        merged = dataclasses.asdict(self)
        merged.update(_read_items(items, "argument"))
        return _checked_together(RannConfig(**merged))


def show_items(config: RannConfig) -> str:
    """Every item and its value, one a line (RaNNC's show_config_items); non-default values are marked."""
    lines = ["rannc config items:"]
    width = max(len(name) for name in _FIELDS)
    for name, field in _FIELDS.items():
        value = getattr(config, name)
        note = "" if value == field.default else f"  (default {field.default!r})"
        lines.append(f"  {name:<{width}} = {value!r}{note}")
    return "\n".join(lines)


_FIELDS = {f.name: f for f in dataclasses.fields(RannConfig)}


def _check_name(name: str, source: str) -> str | None:
    """The item's key; None for a RaNNC-only item (after its one notice); ConfigError for an unknown name."""
    key = name.lower()
    if key in UPSTREAM_ONLY and key not in _FIELDS:
        _notice_upstream_only(key, source)
        return None
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS) + list(UPSTREAM_ONLY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        if close and close[0] in UPSTREAM_ONLY:
            theirs = UPSTREAM_ONLY[close[0]]
            hint = (f"; did you mean '{close[0]}' (RaNNC's, without effect in rannc"
                    f"{f'; the closest rannc item is {theirs!r}' if theirs else ''})?")
        raise ConfigError(f"unknown rannc config item '{name}' (from {source}){hint}")
    return key


def _notice_upstream_only(key: str, source: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    closest = UPSTREAM_ONLY[key]
    hint = f"the closest rannc item is '{closest}'" if closest else "rannc has no counterpart"
    advice = _UPSTREAM_ADVICE.get(key)
    logger.warning("config item '%s' (from %s) is RaNNC's and has no effect in rannc; %s%s", key, source, hint,
                   f" ({advice})" if advice else "")


def _read_items(raw: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Validated {key: value} from {name: value}; `source` names where they came from (None: the name is an
    environment variable, without its prefix). load_deployment=<path> also sets deployment_file."""
    out: dict[str, Any] = {}
    path_from: str | None = None
    for name, value in raw.items():
        where = source or f"environment variable {ENV_PREFIX}{name}"
        key = _check_name(name, where)
        if key is None:
            continue
        if key == "load_deployment" and _is_path(value):
            if "deployment_file" in out and out["deployment_file"] != os.fspath(value):
                raise ConfigError(f"rannc config items 'load_deployment' ({value!r}) and 'deployment_file' "
                                  f"({out['deployment_file']!r}) name different files (from {where})")
            out["load_deployment"], out["deployment_file"], path_from = True, os.fspath(value), where
            continue
        if key == "deployment_file" and path_from is not None:
            if str(value) != out["deployment_file"]:
                raise ConfigError(f"rannc config items 'load_deployment' ({out['deployment_file']!r}) and "
                                  f"'deployment_file' ({value!r}) name different files (from {where})")
            continue
        out[key] = _coerce(key, value, where)
    return out


def _is_path(value: Any) -> bool:
    """A load_deployment value that names a file: a non-empty string (or os.PathLike) that is no boolean word."""
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and value.strip() != "" and value.strip().lower() not in _BOOL_WORDS


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a TOML or environment value to the item's type, or fail naming the item."""
    kind = type(_FIELDS[name].default)
    try:
        if name == "compile":   # auto, or a boolean written as for any boolean item
            text = str(value).strip().lower()
            if isinstance(value, (int, float)) and value in (0, 1):   # as any boolean item takes them
                word = bool(value)
            else:
                word = _BOOL_WORDS.get(text, text)
            out = {True: "true", False: "false"}.get(word, word)
        elif kind is bool:
            if isinstance(value, bool):
                out = value
            elif value is None and name == "load_deployment":  # RaNNCModule(load_deployment=None)
                out = False
            elif isinstance(value, (int, float)) and value in (0, 1):
                out = bool(value)
            elif isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                out = _BOOL_WORDS[value.strip().lower()]
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
    if name == "mem_limit_gb" and value < 0:
        bad = "must be >= 0"
    elif name == "comm_timeout_s" and not value > 0:
        bad = "must be > 0"
    elif name == "mem_margin" and not 0.0 <= value < 1.0:
        bad = "must be in [0, 1)"
    elif name in ("partition_num", "partitioning_dry_run_np") and value < 0:
        bad = "must be >= 0"
    elif name in ("min_pipeline", "max_pipeline", "opt_param_factor", "max_blocks", "profile_repeats") and (
            value < (0 if name == "opt_param_factor" else 1)):
        bad = "is too small"
    elif name == "param_dtype" and value not in ("", "bfloat16"):
        bad = "must be empty (the parameters as they are) or bfloat16"
    elif name == "compile" and value not in ("auto", "true", "false"):
        bad = "must be auto, true or false"
    elif name == "compile_mode" and value not in COMPILE_MODES:
        bad = f"must be one of {', '.join(COMPILE_MODES)}"
    elif name == "compile_options":
        try:
            inductor_options(value)
        except ValueError as exc:
            bad = str(exc)
    elif name == "schedule" and value not in ["auto", *schedule_names()]:
        bad = f"must be one of auto, {', '.join(schedule_names())}"
    elif name == "virtual_stages" and value < 1:
        bad = "must be >= 1"
    elif name == "recompute" and value not in ("auto", "always", "never"):
        bad = "must be one of auto, always, never"
    if bad:
        raise ConfigError(f"rannc config item '{name}' (from {source}) {bad} (got {value!r})")


def compiles(config: RannConfig, device_type: str) -> bool:
    """Whether stages run under torch.compile: the compile item, auto being on for CUDA devices where inductor
    can generate their code (Triton; one H200: BERT-large's step 1.3-2x faster, the 4.9B model's 1.2x) and off
    for CPUs and under zb_h1."""
    if config.compile == "auto":
        from torch.utils._triton import has_triton  # inductor's own test for GPU code generation

        return device_type == "cuda" and config.schedule != "zb_h1" and has_triton()
    return config.compile == "true"


# The modes that replay CUDA graphs, and each one's counterpart without them
WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_mode(config: RannConfig, device_type: str, recompute: bool) -> str:
    """torch.compile's mode for one stage. auto replays CUDA graphs on CUDA devices: a stage's kernels are
    launched from the host one by one otherwise, and at BERT-large batch 64 on one H200 that host time is the
    step (44-73 ms for 41 ms of device work). Never for a recomputing stage, whose checkpoint runs the compiled
    module again inside the backward, which CUDA graph trees fail at (pytorch/pytorch#154306, #148829): a mode
    named in the item that replays graphs gives its counterpart without them there (WITHOUT_GRAPHS; the
    deployment says so)."""
    if config.compile_mode == "auto":
        return "reduce-overhead" if device_type == "cuda" and not recompute else "default"
    if recompute:
        return WITHOUT_GRAPHS.get(config.compile_mode, config.compile_mode)
    return config.compile_mode


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How a module compiles: torch.compile's mode, and inductor options over the mode's (the compile_mode and
    compile_options items). `str()` names both, for logs and the profile cache's key."""

    mode: str = "default"
    options: tuple[tuple[str, Any], ...] = ()

    def inductor_options(self) -> dict[str, Any]:
        """What inductor is given: the mode's options, then the items' over them."""
        import torch._inductor

        return {**torch._inductor.list_mode_options(self.mode), **dict(self.options)}

    def __str__(self) -> str:
        return " ".join([self.mode, *(f"{name}={value!r}" for name, value in self.options)])


DEFAULT_COMPILE = CompileSettings()   # torch.compile's default mode, no options of the items


@functools.lru_cache(maxsize=64)   # read at validation and again for every stage and the profiler
def inductor_options(text: str) -> tuple[tuple[str, Any], ...]:
    """The compile_options item's `name=value` pairs (spaces between them), each name one of inductor's options
    (dotted for nested ones: combo_kernels, triton.max_tiles) and each value read as that option's type (an
    option whose default is None by its declared type: true/false, a number, none, or text); sorted by name.
    ValueError naming what is wrong. `triton.cudagraphs` is left to the compile_mode item, whose auto keeps
    CUDA graphs away from recomputing stages."""
    if not text.split():
        return ()
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    options = {}
    for pair in text.split():
        name, sep, word = pair.partition("=")
        if not sep or not name or not word:
            raise ValueError(f"'{pair}' is not name=value")
        if name not in known:
            raise ValueError(f"'{name}' is not one of inductor's options (torch._inductor.config)")
        if name == "triton.cudagraphs":
            raise ValueError("CUDA graphs are set by the compile_mode item (reduce-overhead; its auto keeps them "
                             "away from stages that recompute)")
        entry = getattr(inductor_config, "_config", {}).get(name)
        options[name] = _option_value(name, word, known[name], getattr(entry, "value_type", None))
    return tuple(sorted(options.items()))


def _option_value(name: str, word: str, current: Any, declared: Any) -> Any:
    """`word` as a value of inductor's option `name`: of the type of its value now, or where that is None, of
    its declared type (`int | None`, `bool | None`, a Literal of words; any of bool, int, float, text where
    nothing is declared)."""
    import types
    import typing

    if current is not None:
        kinds: tuple = (type(current),)
        nullable = False
    else:
        parts = typing.get_args(declared) if isinstance(declared, types.UnionType) or (
            typing.get_origin(declared) is typing.Union) else (declared,)
        nullable = True
        kinds = tuple(str if typing.get_origin(k) is typing.Literal else k for k in parts
                      if k is not type(None) and k is not None) or (bool, int, float, str)
    if nullable and word.lower() == "none":
        return None
    if bool in kinds and word.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[word.lower()]
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(word)
            except ValueError:
                pass
    if str in kinds:
        return word
    if not set(kinds) <= {bool, int, float}:
        raise ValueError(f"option '{name}' holds a {' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}, "
                         f"which compile_options cannot set")
    wanted = " or ".join({bool: "true or false", int: "an integer", float: "a number"}[k] for k in kinds)
    raise ValueError(f"option '{name}' takes {wanted}, not {word!r}")


def stage_compile(config: RannConfig, device_type: str, recompute: bool) -> CompileSettings:
    """How a stage compiles: compile_mode's mode for it (see compile_mode) and the compile_options item."""
    return CompileSettings(compile_mode(config, device_type, recompute), inductor_options(config.compile_options))


def profiled_compile(config: RannConfig, device_type: str) -> CompileSettings:
    """How the profiler compiles its timed runs of blocks: as the stages that do not recompute (all of them
    unless recompute is "always"), so that their price is what they run. A stage the planner then makes
    recompute runs in the default mode, priced as if it replayed CUDA graphs: the price misses the host's
    time launching its kernels, which counts where they are small (recomputation is for stages of large
    activations, whose kernels are long)."""
    return stage_compile(config, device_type, recompute=config.recompute == "always")


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
        items.update(_read_items(table, str(path)))
    items.update(_read_items({var[len(ENV_PREFIX):]: value for var, value in env.items()
                              if var.startswith(ENV_PREFIX) and var != "RANNC_CONF_DIR"}))
    config = _checked_together(RannConfig(**items))
    if config.min_pipeline > config.max_pipeline:
        raise ConfigError(f"rannc config item 'min_pipeline' ({config.min_pipeline}) exceeds 'max_pipeline' "
                          f"({config.max_pipeline})")
    return config


def _checked_together(config: RannConfig) -> RannConfig:
    """Items that constrain each other."""
    if config.virtual_stages > 1 and config.schedule != "auto" and not supports_virtual_stages(config.schedule):
        raise ConfigError(f"rannc config item 'virtual_stages' ({config.virtual_stages}) needs a schedule with "
                          f"virtual stages (interleaved_1f1b), not '{config.schedule}'")
    if config.compile == "true" and config.schedule == "zb_h1":
        raise ConfigError("rannc config item 'compile' cannot be used with schedule 'zb_h1': a compiled stage's "
                          "backward is one autograd node, which the split into input and weight gradients cannot "
                          "divide; use gpipe, 1f1b, interleaved_1f1b or auto")
    return config
