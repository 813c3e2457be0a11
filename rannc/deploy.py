"""The first call: capture the model, cut it into blocks, profile the blocks, plan, and install the plan on this
rank (its stage, its parameters, the patched optimizer, the engine). Every rank runs it together; failures on
one rank are raised on all. The dry run (`plan_dry_run`) shares capture and planning, with estimated profiles
instead of measured ones."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from rannc import dist as rdist
from rannc.config import WITHOUT_GRAPHS, RannConfig, compiles, profiled_compile, stage_compile
from rannc.graph.blocks import Blocks, Linearized, linearize, make_blocks
from rannc.graph.capture import CapturedGraph, capture, preserved_state, retarget_device, written_buffers
from rannc.graph.compiled import CompiledModule
from rannc.graph.fuse import fingerprint_after, fuse_sibling_linears
from rannc.graph.signature import CallSignature
from rannc.graph.stage import ROWS_NONE, build_stage, row_cuts
from rannc.plan.deployment import Deployment, DeploymentError
from rannc.plan.planner import parse_stage_replicas, plan, profile_sizes, rows_within
from rannc.precision import DTYPES, MasterWeights
from rannc.profile.estimate import DeviceSpec, estimate_profiles
from rannc.profile.profiler import (
    LINK_KEYS,
    block_compile,
    build_profile_set,
    cached_links,
    graphed_functions,
    profile_cache_path,
    release_profiler_memory,
)
from rannc.profile.profiles import ProfileSet
from rannc.profile.update import cached_update
from rannc.runtime.engine import Engine
from rannc.runtime.optimizer import OptimizerPatch
from rannc.runtime.outputs import OutputRouter
from rannc.runtime.pipeline import Piece, StageRuntime
from rannc.runtime.placement import Placement

logger = logging.getLogger("rannc.RaNNCModule")


@dataclasses.dataclass
class Installed:
    """What the first call leaves behind on this rank."""

    captured: CapturedGraph
    deployment: Deployment
    placement: Placement
    engine: Engine
    state_keys: list[str]
    masters: MasterWeights | None   # the fp32 masters of a model computed in bfloat16 (param_dtype)


def first_call(model: nn.Module, optimizer_patch: OptimizerPatch | None, config: RannConfig, args: tuple,
               kwargs: dict, tensors: list[torch.Tensor], global_args: list[torch.Tensor], device: torch.device,
               sync_params: bool, save_trace: Callable[[], object]) -> Installed:
    """Capture, profile, plan and install; returns what the module keeps. Exits the process after planning
    under partitioning_dry_run_np. The random number generators come out as they went in (profiling draws
    dropout masks), so that a run resumed with restored generator states draws what the uninterrupted run drew."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _first_call(model, optimizer_patch, config, args, kwargs, tensors, global_args, device, sync_params,
                           save_trace)


def _first_call(model, optimizer_patch, config, args, kwargs, tensors, global_args, device, sync_params,
                save_trace) -> Installed:
    named = OrderedDict(list(model.named_parameters(remove_duplicate=False))
                        + list(model.named_buffers(remove_duplicate=False)))
    if optimizer_patch is not None:
        model_params = {id(p) for p in named.values()}
        stray = [p for g in optimizer_patch.full_groups for p in g if id(p) not in model_params]
        if stray:
            raise ValueError(f"the optimizer holds {len(stray)} tensors that are not parameters of the model")
    sparse = [name for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse:   # every rank alike, before any collective
        raise ValueError(f"rannc sums, clips and steps dense gradients, and {', '.join(sparse[:3])} "
                         f"{'is an embedding' if len(sparse) == 1 else 'are embeddings'} with sparse=True, whose "
                         f"gradients are sparse tensors: build {'it' if len(sparse) == 1 else 'them'} with "
                         f"sparse=False")
    params = [t for t in named.values() if isinstance(t, nn.Parameter)]
    # cast before the capture, so that the graph holds no casts of the weights (autocast's, on every forward)
    masters = MasterWeights(params, DTYPES[config.param_dtype]) if config.param_dtype else None
    try:
        return _capture_plan_install(model, optimizer_patch, config, args, kwargs, tensors, global_args, device,
                                     sync_params, save_trace, named, masters)
    except BaseException:
        if masters is not None:  # the model as the user gave it, fp32 weights and all
            masters.restore(params)
        raise


def _capture_plan_install(model, optimizer_patch, config, args, kwargs, tensors, global_args, device, sync_params,
                          save_trace, named, masters) -> Installed:
    rank, world_size = rdist.get_rank(), rdist.get_world_size()
    t0 = time.perf_counter()
    logger.info("Tracing model ...")
    state_keys = list(model.state_dict().keys())
    model_device = next((t.device for t in named.values()), torch.device("cpu"))
    with preserved_state(model):  # profiling must not count as training (capture preserves on its own)
        call = CallSignature.of(args, kwargs)
        local_args, local_kwargs = call.rebuild(tuple(t.detach().to(model_device) for t in tensors))
        error = None
        try:
            captured, lin, blocks = capture_blocks(model, local_args, config, dynamic_batch=True,
                                                   kwargs=local_kwargs, device=device)
        except Exception as exc:  # raised on every rank, not only where it happened
            error = exc
        rdist.agree_or_raise(error, "capturing the model")
        _announce_outputs(model, captured, rank)
        if config.schedule not in ("auto", "gpipe") and _forced_stages(config) > 1:
            _refuse_in_call(config.schedule, captured.outputs)   # every rank, before any profiling
        batch_size = global_args[captured.batched_inputs.index(True)].shape[0] if any(captured.batched_inputs) else 1
        logger.info("Captured %d operations in %d blocks (%d cut points) in %.1f s", lin.size, blocks.count,
                    len(lin.valid_cuts), time.perf_counter() - t0)
        plan_world = config.partitioning_dry_run_np or world_size
        deployment, error = None, None
        links = cached_links(device, config.profile_cache_dir, logger.info) if not config.load_deployment else {}
        profiling = ProfileJob(config, captured, lin, blocks, global_args, batch_size, plan_world, links,
                               optimizer_patch, device, masters is not None)
        alongside_error = None
        if rank == 0:
            try:
                deployment = _make_plan(profiling)
            except Exception as exc:  # every rank must learn of it, not wait for a plan
                error = exc
        elif profiling.alongside:
            try:
                profiling.profile(quiet=True)
            except Exception as exc:
                alongside_error = exc
        deployment, message = rdist.broadcast_object((deployment, None if error is None else
                                                      f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"planning failed on rank 0: {message}")
    rdist.agree_or_raise(alongside_error, "profiling alongside rank 0")
    logger.info("%s", deployment.table())
    if config.save_deployment and rank == 0 and not config.load_deployment:
        deployment.save(config.deployment_file)
        logger.info("Saved deployment to %s", config.deployment_file)
    if config.partitioning_dry_run_np:
        logger.info("partitioning_dry_run_np=%d: planned without running; exiting", config.partitioning_dry_run_np)
        rdist.barrier()
        sys.exit(0)
    placement, engine = _install(model, captured, lin, deployment, named, optimizer_patch, config, device,
                                 sync_params, save_trace, masters)
    logger.info("RaNNCModule is ready (%.1f s). (rank0)", time.perf_counter() - t0)
    return Installed(captured, deployment, placement, engine, state_keys, masters)


def _announce_outputs(model: nn.Module, captured: CapturedGraph, rank: int) -> None:
    """Say once what the user should know about the captured model's results and layers."""
    if rank != 0:
        return
    outputs = captured.outputs
    if outputs.dropped:
        logger.warning("rannc drops these outputs, which are not tensors or plain values, and returns None "
                       "in their place: %s", ", ".join(outputs.dropped))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        logger.warning("the model has BatchNorm layers: batch statistics are computed per micro-batch and "
                       "replica (as DDP without SyncBatchNorm); running statistics are averaged over a "
                       "stage's replicas after every training call")
    written = written_buffers(captured)
    if written:
        logger.warning("the model's forward writes %d buffers besides BatchNorm's (%s%s; spectral_norm's power "
                       "iteration, a running average): rannc runs the forward once per micro-batch, so they are "
                       "written once per micro-batch and replica, and the floating-point ones are averaged over a "
                       "stage's replicas after every training call; where a step is one micro-batch, once per "
                       "step as in one process",
                       len(written), ", ".join(written[:3]), ", ..." if len(written) > 3 else "")


@dataclasses.dataclass
class ProfileJob:
    """What profiling needs, on every rank. Rank 0 profiles and plans; the other ranks run the same profile at
    the same time and discard it (`alongside`), so that rank 0 measures its blocks while every rank is busy
    as in training: ranks sharing a host's cores, memory bandwidth and links slow each other down (two CPU
    ranks on two cores by a fifth to a half), and a profile taken on an otherwise idle host priced every plan
    too low. Not when rank 0 loads a cached profile, loads a deployment, or only plans (dry run)."""

    config: RannConfig
    captured: CapturedGraph
    lin: Linearized
    blocks: Blocks
    global_args: list[torch.Tensor]
    batch_size: int
    plan_world: int
    links: dict
    optimizer_patch: OptimizerPatch | None
    device: torch.device
    master_weights: bool = False   # the optimizer steps fp32 masters of the (bfloat16) parameters

    def __post_init__(self) -> None:
        config = self.config
        self.compile_blocks = block_compile(compiles(config, self.device.type), config.compile_regions)
        self.compile_settings = profiled_compile(config, self.device.type)
        self.alongside, self.sizes = False, []
        if config.load_deployment:
            return
        self.sizes = profile_sizes(config, self.plan_world, self.blocks.count, self.batch_size,
                                   self.captured.batch_range)
        if rdist.get_world_size() > 1 and not config.partitioning_dry_run_np:
            cached = None
            if rdist.get_rank() == 0:
                path = profile_cache_path(self.captured, self.blocks, self.sizes, self.device,
                                          _autocast_dtype(self.device), self.compile_blocks, config.profile_cache_dir,
                                          self.compile_settings)
                cached = path is not None and path.is_file()
            self.alongside = not rdist.broadcast_object(cached)

    def profile(self, quiet: bool = False):
        """Every block's profile and the optimizer's (`quiet`: alongside rank 0, nothing logged or cached)."""
        config, log = self.config, (lambda *_: None) if quiet else logger.info
        graphed_before = graphed_functions(self.device)
        try:
            with torch.enable_grad():   # a first call under no_grad (evaluation first) still times backwards
                return self._profile(config, log, quiet)
        finally:
            release_profiler_memory(self.device, graphed_before)

    def _profile(self, config: RannConfig, log, quiet: bool):
        update = cached_update(self.optimizer_patch.optimizer if self.optimizer_patch is not None else None,
                               _parameter_dtype(self.captured), self.device, self.master_weights,
                               "" if quiet else config.profile_cache_dir, log)
        return build_profile_set(self.captured, self.lin, self.blocks, self.global_args, self.sizes, self.device,
                                 self.links, config.profile_repeats, "" if quiet else config.profile_cache_dir,
                                 _autocast_dtype(self.device), log=log, show_progress=config.verbose and not quiet,
                                 update=update, compile_blocks=self.compile_blocks,
                                 compile_settings=self.compile_settings)


def _make_plan(job: ProfileJob) -> Deployment:
    config, captured = job.config, job.captured
    if config.load_deployment:
        deployment = Deployment.load(config.deployment_file)
        deployment.check_fits(captured.fingerprint, job.plan_world, job.batch_size, config.deployment_file)
        if not all(rows_within(job.batch_size, s.replicas, deployment.microbatch_count, captured.batch_range)
                   for s in deployment.stages):
            raise DeploymentError(f"the deployment in {config.deployment_file} cuts micro-batches outside the "
                                  f"{captured.batch_range} rows the model's graph holds for (it branches on its "
                                  f"batch size, or fixed it: see the warning at capture); plan anew")
        logger.info("Loaded deployment from %s", config.deployment_file)
        return deployment
    if captured.batch_range != (1, None) and not captured.batch_fixed:   # a fixed batch was named at capture
        low, high = captured.batch_range
        logger.warning("the model branches on its batch size: its graph holds for micro-batches of %d to %s rows "
                       "only, and the plan keeps to them", low, "any number of" if high is None else high)
    logger.info("Running profiler%s ...", " (every rank alongside)" if job.alongside else "")
    profile = job.profile()
    logger.info("Profiling finished%s", f" ({torch.cuda.memory_reserved(job.device) / 2**30:.1f} GiB of the device's "
                f"memory left reserved)" if job.device.type == "cuda" else "")
    logger.info("Assuming batch size: %d", job.batch_size)
    return plan(profile, job.blocks, job.plan_world, job.batch_size, config, captured.fingerprint,
                captured.batch_range, in_call_ok=captured.outputs.kinds == ["scalar"],
                row_cuts=row_cuts(captured, job.lin, job.blocks.bounds))


def _install(model, captured, lin, deployment: Deployment, named: dict, optimizer_patch, config: RannConfig,
             device: torch.device, sync_params: bool, save_trace, masters: MasterWeights | None
             ) -> tuple[Placement, Engine]:
    rank, world_size = rdist.get_rank(), rdist.get_world_size()
    stages = [build_stage(captured, lin, s.start, s.end) for s in deployment.stages]
    if sync_params and world_size > 1:
        comm = rdist.comm_device()
        with torch.no_grad():
            for t in dict.fromkeys(named.values()):
                source = masters.of(t) if masters is not None else t   # rank 0's fp32 value, then its cast
                buf = source.detach().to(comm)
                dist.broadcast(buf, 0)
                source.copy_(buf.to(source.device))
                if source is not t:
                    t.copy_(source)
    placement = Placement(stages, deployment, rank, named)
    placement.place(device)
    if masters is not None:
        masters.keep(placement.local_parameters(), device)
    runtime = None
    forward_group = gradient_group = None
    if deployment.virtual_stages > 1:   # a pair of ranks exchanges values and gradients both ways
        forward_group, gradient_group = dist.new_group(), dist.new_group()
    _check_cuts(deployment, stages)
    pieces = deployment.pieces_of_rank(rank)
    if pieces:
        runtime = StageRuntime([Piece(stages[c], deployment.stages[c].recompute,
                                      _compiled(stages[c].module, c, deployment.stages[c].recompute, config, device))
                                for c in pieces],
                               captured.batched_inputs, device, forward_group=forward_group,
                               gradient_group=gradient_group)
        if config.trace_events:
            runtime.trace, runtime.trace_pid = [], rank
            atexit.register(save_trace)
    if optimizer_patch is not None:
        optimizer_patch.deploy(placement, masters)
    outputs = captured.outputs
    in_call = deployment.schedule != "gpipe" and deployment.pipeline_depth > 1
    if in_call:
        # every rank raises it (each checks the same plan): running GPipe instead would leave the deployment,
        # its report and its predicted step describing a schedule that does not run
        _refuse_in_call(deployment.schedule, outputs)
    router = OutputRouter(outputs, rank, world_size, device, config.gather_inputs)
    engine = Engine(deployment, placement, runtime, [stages[c] for c in pieces], router, captured.batched_inputs,
                    rank, world_size, device, in_call)
    if engine.reducer is not None:
        model.zero_grad(set_to_none=True)  # the reducer sized its buckets with zero gradients
    return placement, engine


def _forced_stages(config: RannConfig) -> int:
    """The pipeline stages the configuration fixes before planning (0: the planner chooses)."""
    if config.stage_replicas:
        return len(parse_stage_replicas(config.stage_replicas))
    return config.partition_num


def _refuse_in_call(schedule: str, outputs) -> None:
    """A schedule running backwards inside the call needs the model's one scalar loss to start them from."""
    if outputs.kinds != ["scalar"]:
        raise DeploymentError(f"schedule '{schedule}' runs backwards inside the call and needs a model returning "
                              f"one scalar loss; this model returns {len(outputs.kinds)} outputs: use "
                              f"schedule='gpipe' or 'auto' (which plans GPipe for it)")


def _compiled(module: torch.nn.Module, index: int, recompute: bool, config: RannConfig,
              device: torch.device) -> CompiledModule | None:
    """Stage `index`'s module under torch.compile where the compile item says so, else None."""
    if not compiles(config, device.type):
        return None
    settings = stage_compile(config, device.type, recompute)
    if settings.mode != config.compile_mode and config.compile_mode in WITHOUT_GRAPHS:
        logger.warning("rannc: stage %d recomputes, and CUDA graphs fail inside activation checkpointing "
                       "(pytorch/pytorch#154306): it compiles in mode %s, not %s", index, settings.mode,
                       config.compile_mode)
    return CompiledModule(module, f"stage {index}", settings, regions=config.compile_regions)


def _check_cuts(deployment: Deployment, stages: list) -> None:
    """Between stages of different replica counts values are cut by rows: each must hold the batch in its
    first dimension (one row per sample) or not depend on the batch at all."""
    for c in range(1, len(stages)):
        if deployment.stages[c - 1].replicas == deployment.stages[c].replicas:
            continue
        for name, factor in zip(stages[c].received, stages[c].received_rows):
            if factor not in (ROWS_NONE, 1):
                raise DeploymentError(
                    f"stages {c - 1} and {c} have {deployment.stages[c - 1].replicas} and "
                    f"{deployment.stages[c].replicas} replicas, so the values between them are cut by rows, but "
                    f"value '{name}' does not hold one row per sample in its first dimension; give the stages "
                    f"equal replica counts or cut the model elsewhere")


def _parameter_dtype(captured: CapturedGraph) -> torch.dtype:
    """The dtype most of the trainable parameter bytes have (what the optimizer steps over)."""
    counts: dict[torch.dtype, int] = {}
    for p in captured.gm.parameters():
        if p.requires_grad:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _autocast_dtype(device: torch.device):
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


# ---- the dry run ---------------------------------------------------------------------------------------------

def capture_blocks(model: nn.Module, example_inputs: tuple, config: RannConfig, dynamic_batch: bool = False,
                   kwargs: dict | None = None, device: torch.device | None = None
                   ) -> tuple[CapturedGraph, Linearized, Blocks]:
    """Capture, retarget the graph's device constants to `device` (when given), and cut into blocks."""
    captured = capture(model, example_inputs, kwargs, dynamic_batch=dynamic_batch)
    if device is not None:
        retarget_device(captured.gm, device)
    if config.fuse_linears:
        fused = fuse_sibling_linears(captured.gm)
        if fused:
            captured.fingerprint = fingerprint_after(captured.fingerprint, fused)
            logger.info("Fused %d groups of sibling linears into one product each (fuse_linears), e.g. %s",
                        len(fused), ", ".join(captured.tensor_name(target) for target in fused[0]))
    lin = linearize(captured)
    return captured, lin, make_blocks(lin, config.max_blocks)


def plan_dry_run(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], world_size: int, batch_size: int,
                 device: DeviceSpec, config: RannConfig | None = None, activation_bytes_per_element: float = 2.0,
                 log=print, measured: ProfileSet | None = None) -> Deployment:
    """The deployment rannc would choose for `world_size` devices of type `device` and this global batch, from
    profiles estimated from the graph (the model may live on the meta device): what `partitioning_dry_run_np`
    does for a live run, for models and machines one does not have at hand. With `measured` (a profile cache
    file of the same model from a live first call, e.g. on one device) the blocks' and the optimizer's times
    and memory are the measured ones, and only the links between devices are the estimate's: the prediction
    for a machine with more devices, written down before it runs."""
    config = config or RannConfig()
    t0 = time.perf_counter()
    captured, lin, blocks = capture_blocks(model, example_inputs, config, dynamic_batch=measured is not None)
    log(f"captured {lin.size} operations into {blocks.count} blocks in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    profile = estimate_profiles(captured, lin, blocks, device, activation_bytes_per_element)
    if measured is not None:
        profile = _with_estimated_links(measured, profile)
    deployment = plan(profile, blocks, world_size, batch_size, config, captured.fingerprint,
                      in_call_ok=captured.outputs.kinds == ["scalar"], row_cuts=row_cuts(captured, lin, blocks.bounds))
    source = "measured profiles" if measured is not None else "estimated profiles"
    log(f"{source} and planned for {world_size} x {device.name} in {time.perf_counter() - t1:.1f} s "
        f"({deployment.candidates_considered} candidate plans priced)")
    return deployment


def _with_estimated_links(measured: ProfileSet, estimated: ProfileSet) -> ProfileSet:
    """`measured` with the estimate's links between devices, after checking that its blocks are this graph's
    (the same count, each reading the same parameters)."""
    if len(measured.blocks) != len(estimated.blocks) or any(
            sorted(m.tensors) != sorted(e.tensors) for m, e in zip(measured.blocks, estimated.blocks)):
        raise ValueError(f"the measured profile has {len(measured.blocks)} blocks that do not match the "
                         f"{len(estimated.blocks)} blocks of this model's graph (another model, configuration "
                         f"or max_blocks)")
    return dataclasses.replace(measured, **{key: getattr(estimated, key) for key in LINK_KEYS})
