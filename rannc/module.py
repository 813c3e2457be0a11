"""RaNNCModule: wraps an unmodified model; on the first call it captures, profiles, plans and deploys,
then runs every call as a pipeline over all processes, returning the loss of the global batch."""

from __future__ import annotations

import atexit
import json
import logging
import math
import sys
import time
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from rannc import dist as rdist
from rannc.config import RannConfig, load_config
from rannc.graph.blocks import linearize, make_blocks
from rannc.graph.capture import capture, retarget_device
from rannc.graph.dropout import dropout_active
from rannc.graph.stage import build_stage
from rannc.plan.deployment import Deployment
from rannc.plan.planner import microbatch_candidates, plan
from rannc.profile.profiler import build_profile_set, measure_links
from rannc.runtime import grads as grad_ops
from rannc.runtime.chunks import Chunk, split_batch
from rannc.runtime.optimizer import OptimizerPatch
from rannc.runtime.pipeline import StageRuntime
from rannc.runtime.placement import Placement
from rannc.runtime.schedule import gpipe_backward, gpipe_forward, one_f_one_b
from rannc.runtime.state import gather_state_dict, load_into_local

logger = logging.getLogger("rannc.RaNNCModule")


class _Flags:
    """Process-wide switches of RaNNC's module-level API."""

    delay_grad_allreduce = False
    keep_graph = False
    sync_params_on_init = True


FLAGS = _Flags()


class _PipelineLoss(torch.autograd.Function):
    """Ties the returned loss to the pipeline: its backward runs the backward schedule."""

    @staticmethod
    def forward(ctx, anchor, value, module):
        ctx.module = module
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.module._backward(grad_output)
        return None, None, None


class RaNNCModule(nn.Module):
    """Wrap `model` (and the `optimizer` over its parameters); call it like the model with the rank's
    local batch. The result is the loss of the global batch (the union of all ranks' local batches),
    the same on every rank."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 use_amp_master_params: bool = False, allreduce_amp_master_params: bool = False,
                 enable_apex_amp: bool = False, check_unused_values: bool = False,
                 config: RannConfig | None = None, **config_items: Any):
        super().__init__()
        if enable_apex_amp or use_amp_master_params:
            raise NotImplementedError("apex amp is not supported; use torch.autocast around the call")
        self.config = (config or load_config()).replace(**config_items) if config_items else (
            config or load_config())
        rdist.init(self.config.comm_timeout_s)
        self.model = model
        self._optimizer_patch = OptimizerPatch(optimizer) if optimizer is not None else None
        self._dropout_enabled = True
        self._deployment: Deployment | None = None
        self._runtime: StageRuntime | None = None
        self._placement: Placement | None = None
        self._captured = None
        self._reducer = None
        self._interleaved_before: dict | None = None  # 1F1B: gradients set aside until loss.backward(g)
        self._anchor = torch.zeros((), requires_grad=True)
        self.rank = rdist.get_rank()
        self.world_size = rdist.get_world_size()
        self.device = rdist.device()
        if self.config.verbose and self.rank == 0 and not logging.getLogger("rannc").handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("<%(name)s>: %(message)s"))
            logging.getLogger("rannc").addHandler(handler)
            logging.getLogger("rannc").setLevel(logging.INFO)

    # ---- public API ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._deployment is not None

    @property
    def deployment(self) -> Deployment | None:
        return self._deployment

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_args(args, kwargs)
        self._check_shapes(args)
        if self._deployment is None:
            self._deploy(args, self._gather_global_batch(args))
        if self._local_rows_only():
            return self._run(list(args), local=True)
        return self._run(self._gather_global_batch(args))

    def enable_dropout(self, enable: bool) -> None:
        self._dropout_enabled = bool(enable)

    def allreduce_grads(self) -> None:
        """Sum gradients over each parameter's holders (needed after delay_grad_allreduce(True))."""
        self._require_ready("allreduce_grads")
        grad_ops.allreduce_grads(self._placement)

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by the global norm of the whole model's gradients; returns that norm."""
        self._require_ready("clip_grad_norm")
        return grad_ops.clip_grad_norm(self._placement, self.device, max_norm, norm_type)

    def state_dict(self, *args, sync_all_ranks: bool = False, no_hook: bool = False, **kwargs) -> "OrderedDict":
        """Full state dict on rank 0 (every rank with sync_all_ranks); collective once deployed."""
        if self._placement is None:
            return self.model.state_dict(*args, **kwargs)
        keys = list(self._state_keys)
        return gather_state_dict(self._placement, keys, sync_all_ranks)

    def load_state_dict(self, state_dict: dict, strict: bool = True, **kwargs):
        if self._placement is None:
            return self.model.load_state_dict(state_dict, strict=strict)
        load_into_local(self._placement, state_dict, strict)

    def save_deployment(self, path: str) -> None:
        self._require_ready("save_deployment")
        if self.rank == 0:
            self._deployment.save(path)

    def save_trace(self, path: str | None = None) -> str | None:
        """Write this rank's schedule events (trace_events) as a Chrome trace: `<event_trace_file>.rank<r>`
        unless `path` is given. Also runs at exit when trace_events is on."""
        if self._runtime is None or self._runtime.trace is None:
            return None
        path = path or f"{self.config.event_trace_file}.rank{self.rank}"
        with open(path, "w") as f:
            json.dump({"traceEvents": self._runtime.trace}, f)
        return path

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    # ---- the first call ------------------------------------------------------------------------------
    def _deploy(self, local_args: tuple, global_args: list[torch.Tensor]) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        logger.info("Tracing model ...")
        self._state_keys = list(self.model.state_dict().keys())
        named = OrderedDict(list(self.model.named_parameters(remove_duplicate=False))
                            + list(self.model.named_buffers(remove_duplicate=False)))
        if self._optimizer_patch is not None:
            model_params = {id(p) for p in named.values()}
            stray = [p for g in self._optimizer_patch.full_groups for p in g if id(p) not in model_params]
            if stray:
                raise ValueError(f"the optimizer holds {len(stray)} tensors that are not parameters of the model")
        model_device = next((t.device for t in named.values()), torch.device("cpu"))
        captured = capture(self.model, tuple(a.detach().to(model_device) for a in local_args))
        retarget_device(captured.gm, self.device)
        lin = linearize(captured)
        blocks = make_blocks(lin, cfg.max_blocks)
        self._captured = captured
        batch_size = global_args[captured.batched_inputs.index(True)].shape[0] if any(
            captured.batched_inputs) else 1
        logger.info("Captured %d operations in %d blocks (%d cut points) in %.1f s", lin.size, blocks.count,
                    len(lin.valid_cuts), time.perf_counter() - t0)
        plan_world = cfg.partitioning_dry_run_np or self.world_size
        deployment, error = None, None
        links = measure_links(self.device) if not cfg.load_deployment and self.world_size > 1 else {}
        if self.rank == 0:
            try:
                deployment = self._make_plan(captured, lin, blocks, global_args, batch_size, plan_world, links)
            except Exception as exc:  # every rank must learn of it, not wait for a plan
                error = exc
        deployment, message = rdist.broadcast_object((deployment, None if error is None else
                                                      f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"planning failed on rank 0: {message}")
        logger.info("%s", deployment.table())
        if cfg.save_deployment and self.rank == 0 and not cfg.load_deployment:
            deployment.save(cfg.deployment_file)
            logger.info("Saved deployment to %s", cfg.deployment_file)
        if cfg.partitioning_dry_run_np:
            logger.info("partitioning_dry_run_np=%d: planned without running; exiting",
                        cfg.partitioning_dry_run_np)
            rdist.barrier()
            sys.exit(0)
        self._install(captured, lin, deployment, named)
        logger.info("RaNNCModule is ready (%.1f s). (rank0)", time.perf_counter() - t0)

    def _make_plan(self, captured, lin, blocks, global_args, batch_size, plan_world, links) -> Deployment:
        cfg = self.config
        if cfg.load_deployment:
            deployment = Deployment.load(cfg.deployment_file)
            deployment.check_fits(captured.fingerprint, plan_world, batch_size, cfg.deployment_file)
            logger.info("Loaded deployment from %s", cfg.deployment_file)
            return deployment
        sizes = set()
        stage_counts = [cfg.partition_num] if cfg.partition_num else range(1, plan_world + 1)
        for s in stage_counts:
            r = max(1, plan_world // s)
            for m in microbatch_candidates(cfg, batch_size, r):
                sizes.add(math.ceil(batch_size / (m * r)))
        sizes = sorted(sizes)
        if cfg.profile_by_acc:
            # never run the large micro-batches on the device: measure the two smallest and extend the line
            sample_sizes = sizes[:2]
        else:
            sample_sizes = sorted({sizes[0], sizes[-1]})
        logger.info("Running profiler ...")
        profile = build_profile_set(captured, lin, blocks, global_args, sample_sizes, self.device, links,
                                    cfg.profile_repeats, cfg.profile_cache_dir, _autocast_dtype(self.device),
                                    log=logger.info, show_progress=cfg.verbose)
        logger.info("Profiling finished")
        logger.info("Assuming batch size: %d", batch_size)
        return plan(profile, blocks, plan_world, batch_size, cfg, captured.fingerprint)

    def _install(self, captured, lin, deployment: Deployment, named: dict) -> None:
        stages = [build_stage(captured, lin, s.start, s.end) for s in deployment.stages]
        if FLAGS.sync_params_on_init and self.world_size > 1:
            comm = rdist.comm_device()
            with torch.no_grad():
                for t in dict.fromkeys(named.values()):
                    buf = t.detach().to(comm)
                    dist.broadcast(buf, 0)
                    t.copy_(buf.to(t.device))
        placement = Placement(stages, deployment, self.rank, named)
        placement.place(self.device)
        self._placement = placement
        my_stage = deployment.stage_of_rank(self.rank)
        if my_stage is not None:
            plan_s = deployment.stages[my_stage]
            replica = plan_s.ranks.index(self.rank)
            prev_rank = deployment.stages[my_stage - 1].ranks[replica] if my_stage > 0 else None
            next_rank = deployment.stages[my_stage + 1].ranks[replica] if my_stage + 1 < len(stages) else None
            self._runtime = StageRuntime(stages[my_stage], captured.batched_inputs, self.device, prev_rank,
                                         next_rank, plan_s.recompute)
            if self.config.trace_events:
                self._runtime.trace, self._runtime.trace_pid = [], self.rank
                atexit.register(self.save_trace)
            self._replica = replica
        if self._optimizer_patch is not None:
            self._optimizer_patch.deploy(placement)
        self._reducer = None
        if self._runtime is not None and self.world_size > 1:
            self._reducer = grad_ops.OverlappedAllReduce(placement, self._runtime.stage.parameters())
            self.model.zero_grad(set_to_none=True)  # the reducer sized its buckets with zero gradients
        self._deployment = deployment

    # ---- every call ----------------------------------------------------------------------------------
    def _check_args(self, args: tuple, kwargs: dict) -> None:
        if kwargs:
            raise TypeError(f"RaNNCModule does not take keyword arguments; pass tensors positionally "
                            f"(got: {', '.join(f'{k}=...' for k in kwargs)})")
        if not args:
            raise TypeError("RaNNCModule needs at least one tensor argument")
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"RaNNCModule takes only tensors; argument {i} is {type(a).__name__}")
            if self.device.type == "cuda" and a.device != self.device:
                raise ValueError(f"argument {i} is on {a.device}; under NCCL every input must be on this "
                                 f"rank's device {self.device}")
        if self._captured is not None and len(args) != len(self._captured.input_names):
            raise TypeError(f"RaNNCModule was deployed for {len(self._captured.input_names)} arguments, got "
                            f"{len(args)}")

    def _local_rows_only(self) -> bool:
        """Plain data parallelism over all ranks in one micro-batch: each replica's rows are exactly its
        own local batch, so nothing needs to be gathered."""
        d = self._deployment
        return len(d.stages) == 1 and d.microbatch_count == 1 and d.replicas == self.world_size

    def _check_shapes(self, args: tuple) -> None:
        """Collective: every rank passes tensors of the same shapes (local batches of one size)."""
        if self.world_size == 1:
            return
        comm = rdist.comm_device()
        shapes = torch.tensor([d for a in args for d in ([a.dim()] + list(a.shape) + [0] * (8 - a.dim()))],
                              dtype=torch.int64, device=comm)
        everyone = [torch.empty_like(shapes) for _ in range(self.world_size)]
        dist.all_gather(everyone, shapes)
        everyone_rows = [e.view(len(args), 9).tolist() for e in everyone]
        for rank, rows in enumerate(everyone_rows):
            for i, (mine, theirs) in enumerate(zip(everyone_rows[self.rank], rows)):
                if mine[0] != theirs[0] or mine[2:] != theirs[2:]:
                    raise ValueError(f"argument {i} has shape {_shape(mine)} on rank {self.rank} but "
                                     f"{_shape(theirs)} on rank {rank}; all ranks must pass the same shapes")
            for i, (mine, theirs) in enumerate(zip(everyone_rows[self.rank], rows)):
                if mine[0] > 0 and mine[1] != theirs[1]:
                    raise ValueError(f"local batch sizes differ: argument {i} has {mine[1]} rows on rank "
                                     f"{self.rank} and {theirs[1]} on rank {rank}; every rank must pass a "
                                     f"local batch of the same size")

    def _gather_global_batch(self, args: tuple) -> list[torch.Tensor]:
        """All ranks' local batches concatenated in rank order (the global batch), on every rank."""
        if self.world_size == 1:
            return list(args)
        comm = rdist.comm_device()
        out = []
        for a in args:
            if a.dim() == 0:
                out.append(a)
                continue
            src = a.detach().to(comm).contiguous()
            parts = [torch.empty_like(src) for _ in range(self.world_size)]
            dist.all_gather(parts, src)
            out.append(torch.cat(parts).to(self.device))
        return out

    def _run(self, batch_args: list[torch.Tensor], local: bool = False) -> torch.Tensor:
        """`batch_args`: the global batch, or with `local` this rank's rows of it (data parallelism)."""
        deployment = self._deployment
        grad = torch.is_grad_enabled()
        key = (_autocast_key(self.device), grad)
        rows = batch_args[self._captured.batched_inputs.index(True)].shape[0] if any(
            self._captured.batched_inputs) else 1
        batch = rows * self.world_size if local else rows
        if batch != deployment.batch_size:
            raise ValueError(f"the global batch has {batch} samples but the deployment was planned for "
                             f"{deployment.batch_size}; keep the local batch size fixed")
        chunks = split_batch(batch, deployment.microbatch_count, deployment.replicas)
        partial = torch.zeros((), dtype=torch.float32, device=self.device)
        if self._runtime is not None:
            my_chunks = [row[self._replica] for row in chunks]
            if local:
                my_chunks = [Chunk(0, rows, c.weight) for c in my_chunks]
            self._runtime.keep_graph = FLAGS.keep_graph
            self._runtime.clear()
            with dropout_active(self.training and self._dropout_enabled):
                if grad and deployment.schedule == "1f1b":
                    results = self._run_interleaved(my_chunks, batch_args, key)
                else:
                    results = self._runtime.run_forward(gpipe_forward(deployment.microbatch_count), my_chunks,
                                                        batch_args, key)
            for chunk, outputs in results:
                if len(outputs) != 1 or not isinstance(outputs[0], torch.Tensor) or outputs[0].dim() != 0:
                    raise TypeError("RaNNCModule runs models whose forward returns one scalar loss; this model "
                                    f"returns {len(outputs)} value(s) of shapes "
                                    f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else o for o in outputs]}")
                partial = partial + outputs[0].detach().float() * chunk.weight
        if self.world_size > 1:
            comm = rdist.comm_device()
            partial = partial.to(comm).reshape(1)
            dist.all_reduce(partial)
            partial = partial.to(self.device).reshape(())
        if not grad:
            return partial
        return _PipelineLoss.apply(self._anchor, partial, self)

    def _run_interleaved(self, chunks, batch_args, key):
        """1F1B: backwards run inside the call with d(loss) = 1; the gradients of this call are kept apart
        from earlier ones so that loss.backward(g) can scale them by g (gradients are linear in g)."""
        if FLAGS.keep_graph:
            raise ValueError("keep_graph(True) needs schedule='gpipe': 1F1B frees each micro-batch's graph as it goes")
        deployment = self._deployment
        self._interleaved_before = self._set_aside_grads()
        stage = deployment.stage_of_rank(self.rank)
        actions = one_f_one_b(stage, len(deployment.stages), deployment.microbatch_count)
        ones = torch.ones((), dtype=torch.float32, device=self.device)
        return self._reducing_gradients(
            lambda: self._runtime.run_actions(actions, chunks, batch_args, key, ones))

    def _reducing_gradients(self, run_backwards):
        """Run the backward actions with the gradient all-reduce overlapping them (or after them, or not
        at all under delay_grad_allreduce)."""
        overlap = self._reducer is not None and not FLAGS.delay_grad_allreduce and not FLAGS.keep_graph
        if overlap:
            self._reducer.begin(self._deployment.microbatch_count)
        try:
            result = run_backwards()
        except BaseException:
            if overlap:
                self._reducer.cancel()
            raise
        if overlap:
            self._reducer.finish()
        elif not FLAGS.delay_grad_allreduce:
            grad_ops.allreduce_grads(self._placement)
        return result

    def _set_aside_grads(self) -> dict:
        before = {}
        for p in self._placement.local_parameters():
            if p.grad is not None:
                before[p] = p.grad
                p.grad = None
        return before

    @staticmethod
    def _add_back(before: dict) -> None:
        for p, grad in before.items():
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

    def _backward(self, grad_output: torch.Tensor) -> None:
        before = self._interleaved_before
        if before is not None:
            # the pipeline already ran its backwards (1F1B); apply d(loss) and restore earlier gradients
            self._interleaved_before = None
            if grad_output.item() != 1.0:
                grads = [p.grad for p in self._placement.local_parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, grad_output.to(grads[0].device, grads[0].dtype))
            self._add_back(before)
            return
        # Gradients already summed by an earlier backward (accumulation without delay_grad_allreduce) are
        # identical on every holder: set them aside so only this backward's part is summed, then add back.
        reduced_before = self._set_aside_grads() if not FLAGS.delay_grad_allreduce else {}

        def run_backwards():
            if self._runtime is not None:
                with dropout_active(self.training and self._dropout_enabled):
                    self._runtime.run_backward(gpipe_backward(self._deployment.microbatch_count),
                                               grad_output.to(self.device))

        self._reducing_gradients(run_backwards)
        self._add_back(reduced_before)

    def _require_ready(self, what: str) -> None:
        if self._placement is None:
            raise RuntimeError(f"{what}() needs the deployment, which the first forward call creates")


def _shape(row: list[int]) -> tuple[int, ...]:
    return tuple(row[1:1 + row[0]])


def _autocast_key(device: torch.device):
    if torch.is_autocast_enabled(device.type):
        return str(torch.get_autocast_dtype(device.type))
    return None


def _autocast_dtype(device: torch.device):
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
