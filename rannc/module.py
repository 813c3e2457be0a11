"""RaNNCModule: wraps an unmodified model; on the first call it captures, profiles, plans and deploys,
then hands every call to the engine (`runtime/engine.py`), which runs the pipeline over all processes."""

from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from rannc import dist as rdist
from rannc import faults
from rannc.config import RannConfig, load_config, show_items
from rannc.deploy import first_call
from rannc.graph.signature import CallSignature
from rannc.log import setup_logging
from rannc.plan.deployment import Deployment
from rannc.runtime import grads as grad_ops
from rannc.runtime.engine import CallFlags, Engine
from rannc.runtime.optimizer import OptimizerPatch
from rannc.runtime.placement import Placement
from rannc.runtime.state import fetch_tensor, gather_state_dict, load_into_local, restore_all

logger = logging.getLogger("rannc.RaNNCModule")


class _Flags:
    """Process-wide switches of RaNNC's module-level API."""

    delay_grad_allreduce = False
    keep_graph = False
    sync_params_on_init = True


FLAGS = _Flags()


class RaNNCModule(nn.Module):
    """Wrap `model` (and the `optimizer` over its parameters); call it like the model, with the rank's local
    batch, by position or keyword. A scalar result is the value of the global batch (the union of all
    ranks' local batches), the same on every rank; a batched result holds the rows of this rank's local
    batch. See the README's "Bring your own model" for the gradient semantics."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 gather_inputs: bool = True, load_deployment: Any = None, enable_apex_amp: bool = False,
                 allreduce_amp_master_params: bool = False, enable_zero: bool = False,
                 check_unused_values: bool = False, offload_params: bool = False,
                 use_amp_master_params: bool = False, config: RannConfig | None = None, **config_items: Any):
        super().__init__()
        if enable_apex_amp or use_amp_master_params:
            raise NotImplementedError("apex amp is not supported; use torch.autocast around the call, and "
                                      "param_dtype='bfloat16' for bfloat16 weights with fp32 masters")
        if enable_zero or offload_params:
            raise NotImplementedError(f"{'enable_zero' if enable_zero else 'offload_params'}=True is not "
                                      f"supported by rannc: the planner fits every stage in device memory with "
                                      f"pipeline stages, replicas and recomputation instead")
        if load_deployment is not None:
            config_items["load_deployment"] = load_deployment
        config_items["gather_inputs"] = gather_inputs
        self.config = (config or load_config()).replace(**config_items)
        if self.config.param_dtype and optimizer is None:
            raise ValueError(f"param_dtype={self.config.param_dtype!r} needs the optimizer: "
                             f"RaNNCModule(model, optimizer, ...) (it steps the fp32 master weights)")
        rdist.init(self.config.comm_timeout_s)
        faults.install()
        self.model = model
        self.training = model.training   # a model put in eval mode before wrapping runs in eval mode, as it would
        self._optimizer_patch = OptimizerPatch(optimizer) if optimizer is not None else None
        self._dropout_enabled = True
        self._deployment: Deployment | None = None
        self._placement: Placement | None = None
        self._fused_grads = grad_ops.FusedGrads()   # clipping's kernel tables, kept from step to step
        self._engine: Engine | None = None
        self._captured = None
        self._masters = None
        self.rank = rdist.get_rank()
        self.world_size = rdist.get_world_size()
        self.device = rdist.device()
        setup_logging(self.config.verbose, self.rank)
        if self.config.show_config_items and self.rank == 0:
            logger.info("%s", show_items(self.config))

    # ---- calling ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._deployment is not None

    @property
    def deployment(self) -> Deployment | None:
        return self._deployment

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        error, call, tensors = None, None, []
        try:
            call = self._captured.call if self._captured is not None else CallSignature.of(args, kwargs)
            tensors = call.tensors(args, kwargs)
            self._check_tensors(tensors, call)
        except (TypeError, ValueError) as exc:  # checked on every rank together below, never alone
            error = exc
        faults.count_call()
        self._agree_on_inputs(error, call, tensors)
        global_args = self._deploy(args, kwargs, tensors) if self._engine is None else None
        self._refuse_eval_path()
        return self._call(args, kwargs, tensors, global_args)

    @faults.guarded("forward")
    def _deploy(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first call, once every rank agreed on its inputs: capture, profile, plan, install. Returns the
        global batch it gathered, which the call then runs on."""
        global_args = self._global_batch(tensors)
        installed = first_call(self.model, self._optimizer_patch, self.config, args, kwargs, tensors,
                               global_args, self.device, FLAGS.sync_params_on_init, self.save_trace)
        self._captured, self._deployment = installed.captured, installed.deployment
        self._placement, self._engine = installed.placement, installed.engine
        self._state_keys = installed.state_keys
        self._masters = installed.masters
        return global_args

    def _refuse_eval_path(self) -> None:
        """An eval-mode call of a model whose eval mode runs other operations than its graph holds. Every rank
        raises it together (the capture is the same everywhere), so nothing is reported or torn down: the job
        may go on training."""
        if not self.training and self._captured.eval_difference is not None:
            raise RuntimeError(
                f"rannc: {type(self.model).__name__}.forward runs other operations in eval mode than in train mode, "
                f"beyond dropout and BatchNorm, which rannc switches itself: {self._captured.eval_difference}. rannc "
                f"runs the graph it traced in train mode, so this call would run the train-mode operations. Evaluate "
                f"a copy of the model outside rannc (load this module's state_dict() into it), or let the branch "
                f"follow an argument of forward instead of self.training")

    @faults.guarded("forward")
    def _call(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor],
              global_args: list[torch.Tensor] | None) -> Any:
        """Run the engine on a call every rank agreed on (`global_args`: the first call's gathered batch)."""
        local = self._local_rows_only()
        batch_args = tensors if local else (global_args or self._global_batch(tensors))
        leaves = self._engine.run(batch_args, local, self.config.gather_inputs, train=self.training,
                                  dropout=self.training and self._dropout_enabled, flags=_call_flags)
        return self._captured.outputs.rebuild(leaves)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped model (`wrapped.config`, `wrapped.embeddings`) read through, as in RaNNC."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    # ---- gradients ----------------------------------------------------------------------------------
    @faults.guarded("allreduce_grads")
    def allreduce_grads(self) -> None:
        """Sum gradients over each parameter's holders (needed after delay_grad_allreduce(True))."""
        self._require_ready("allreduce_grads")
        self._engine.allreduce_grads()

    @faults.guarded("clip_grad_norm")
    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by the global norm of the whole model's gradients; returns that norm. Collective."""
        self._require_ready("clip_grad_norm")
        return grad_ops.clip_grad_norm(self._placement, self.device, max_norm, norm_type, self._fused_grads)

    @faults.guarded("calc_grad_norm")
    def calc_grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """The global norm of the whole model's gradients, each parameter counted once. Collective."""
        self._require_ready("calc_grad_norm")
        return grad_ops.global_grad_norm(self._placement, self.device, norm_type, self._fused_grads)

    _calc_grad_norm = calc_grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    # ---- parameters and state -----------------------------------------------------------------------
    def get_param(self, name: str, amp_master_param: bool = False) -> torch.Tensor:
        """The full value of parameter (or buffer) `name`, on every rank (a CPU copy once deployed).
        Collective after deployment: every rank asks for the same names in the same order. Under
        param_dtype: the bfloat16 value the model computes with, or with `amp_master_param` the fp32 master."""
        return self._get_tensor(name, grad=False, master=amp_master_param)

    def get_param_grad(self, name: str, amp_master_param: bool = False) -> torch.Tensor | None:
        """The gradient of parameter `name` as its holders have it (summed unless delayed), on every rank.
        Collective after deployment. Under param_dtype, `amp_master_param` gives it in fp32."""
        return self._get_tensor(name, grad=True, master=amp_master_param)

    def _get_tensor(self, name: str, grad: bool, master: bool = False) -> torch.Tensor | None:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(self.model.named_buffers(remove_duplicate=False))
        if name not in named:
            raise KeyError(f"the model has no parameter or buffer named '{name}'")
        t = named[name]
        if self._placement is None:
            value = t.grad if grad else t
            return None if value is None else value.detach()
        return fetch_tensor(self._placement, name, grad, self._masters if master else None)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True,
                         from_global: bool = False):
        """This rank's parameters once deployed (all of them before); `from_global=True`: every parameter
        with its full value (CPU copies, collective)."""
        return self._named(self.model.named_parameters(prefix, recurse, remove_duplicate), from_global, prefix)

    def parameters(self, recurse: bool = True, from_global: bool = False):
        for _, p in self.named_parameters(recurse=recurse, from_global=from_global):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True,
                      from_global: bool = False):
        return self._named(self.model.named_buffers(prefix, recurse, remove_duplicate), from_global, prefix)

    def buffers(self, recurse: bool = True, from_global: bool = False):
        for _, b in self.named_buffers(recurse=recurse, from_global=from_global):
            yield b

    def _named(self, items, from_global: bool, prefix: str):
        items = list(items)
        if self._placement is None:
            return iter(items)
        if from_global:
            keys = [n[len(prefix) + 1:] if prefix else n for n, _ in items]
            full = gather_state_dict(self._placement, keys, True, self._masters)
            return iter([(n, full[k]) for (n, _), k in zip(items, keys)])
        return iter([(n, t) for n, t in items if self._placement.is_local(t)])

    def state_dict(self, *args, sync_all_ranks: bool = False, no_hook: bool = False, rank0_only: bool = True,
                   amp_master_params: bool = True, sync_grad: bool = False, **kwargs) -> OrderedDict:
        """The full state dict on rank 0 (`{}` elsewhere); on every rank with `sync_all_ranks=True` or
        `rank0_only=False`. Collective once deployed."""
        if sync_grad:
            raise NotImplementedError("state_dict(sync_grad=True) is not supported: gradients are not part of "
                                      "rannc's state dicts; use get_param_grad(name)")
        if self._placement is None:
            return self.model.state_dict(*args, **kwargs)
        return gather_state_dict(self._placement, list(self._state_keys), sync_all_ranks or not rank0_only,
                                 self._masters if amp_master_params else None)

    def load_state_dict(self, state_dict: dict, strict: bool = True, **kwargs):
        if self._placement is None:
            return self.model.load_state_dict(state_dict, strict=strict)
        load_into_local(self._placement, state_dict, strict, self._masters)

    def undeploy(self) -> None:
        """Give the model back whole: every rank's model holds every parameter and buffer again (and the
        optimizer all of its parameters, with their state); the next call plans and deploys anew.
        Collective."""
        if self._placement is None:
            return
        optimizer_state = self._optimizer_patch.state_dict() if self._optimizer_patch is not None else None
        full = gather_state_dict(self._placement, list(self._state_keys), True, self._masters)
        restore_all(self._placement, full, self.device if self.device.type == "cuda" else None, self._masters)
        if self._optimizer_patch is not None:
            self._optimizer_patch.undeploy()
            self._optimizer_patch.load_state_dict(optimizer_state)
        self._deployment = self._placement = self._engine = self._captured = self._masters = None

    # ---- switches and files -------------------------------------------------------------------------
    def enable_dropout(self, enable: bool) -> None:
        self._dropout_enabled = bool(enable)

    def save_deployment(self, path: str) -> None:
        self._require_ready("save_deployment")
        if self.rank == 0:
            self._deployment.save(path)

    def save_trace(self, path: str | None = None) -> str | None:
        """Write this rank's schedule events (trace_events) as a Chrome trace: `<event_trace_file>.rank<r>`
        unless `path` is given. Also runs at exit when trace_events is on."""
        runtime = self._engine.runtime if self._engine is not None else None
        if runtime is None or runtime.trace is None:
            return None
        path = path or f"{self.config.event_trace_file}.rank{self.rank}"
        with open(path, "w") as f:
            json.dump({"traceEvents": runtime.trace}, f)
        return path

    # ---- every call ----------------------------------------------------------------------------------
    def _check_tensors(self, tensors: list[torch.Tensor], call: CallSignature) -> None:
        if self.device.type == "cuda":
            for path, t in zip(call.tensor_paths(), tensors):
                if t.device != self.device:
                    raise ValueError(f"argument {path} is on {t.device}; under NCCL every input must be on this "
                                     f"rank's device {self.device}")

    def _local_rows_only(self) -> bool:
        """Plain data parallelism over all ranks in one micro-batch: each replica's rows are exactly its
        own local batch, so nothing needs to be gathered."""
        d = self._deployment
        return (self.config.gather_inputs and len(d.stages) == 1 and d.microbatch_count == 1
                and d.replicas == self.world_size)

    @faults.explained("checking the call's inputs")
    def _agree_on_inputs(self, error: Exception | None, call: CallSignature | None,
                         tensors: list[torch.Tensor]) -> None:
        """Collective, one small all-gather per call: every rank learns whether any rank's call was refused
        or passes tensors of other shapes, dtypes or local batch size than the others, and then every rank
        raises the same error, naming the rank."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        signature = [(t.dim(), tuple(t.shape[1:]) if t.dim() else (), str(t.dtype)) for t in tensors]
        convention = _convention(call)
        rows = next((t.shape[0] for t in tensors if t.dim() > 0), 0)
        digest = zlib.crc32(repr((signature, convention)).encode()) if error is None else 0
        summary = torch.tensor([0 if error is None else 1, len(tensors), rows, digest], dtype=torch.int64,
                               device=rdist.comm_device())
        everyone = [torch.empty_like(summary) for _ in range(self.world_size)]
        dist.all_gather(everyone, summary)
        table = [e.tolist() for e in everyone]
        if all(row == table[0] for row in table) and error is None:
            return
        paths = call.tensor_paths() if call is not None else []
        detail = (None if error is None else f"{type(error).__name__}: {error}",
                  [(p, tuple(t.shape), str(t.dtype)) for p, t in zip(paths, tensors)], convention)
        reports = rdist.all_gather_objects(detail)
        for rank, (message, _, _) in enumerate(reports):
            if message is not None:
                if rank == self.rank:
                    raise error
                raise ValueError(f"the call was refused on rank {rank}: {message}")
        raise ValueError(_input_mismatch(reports, 0))  # the same words on every rank

    def _global_batch(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The global batch on every rank: all ranks' local batches concatenated in rank order, or rank 0's
        batch under gather_inputs=False."""
        if self.world_size == 1:
            return list(tensors)
        comm = rdist.comm_device()
        out = []
        for a in tensors:
            src = a.detach().to(comm).contiguous()
            if not self.config.gather_inputs:
                dist.broadcast(src, 0)
                out.append(src.to(self.device))
            elif a.dim() == 0:
                out.append(a)
            else:
                parts = [torch.empty_like(src) for _ in range(self.world_size)]
                dist.all_gather(parts, src)
                out.append(torch.cat(parts).to(self.device))
        return out

    def _require_ready(self, what: str) -> None:
        if self._placement is None:
            raise RuntimeError(f"{what}() needs the deployment, which the first forward call creates")


def _call_flags() -> CallFlags:
    return CallFlags(FLAGS.delay_grad_allreduce, FLAGS.keep_graph)


def _convention(call: CallSignature | None) -> tuple:
    """How a call passes its arguments: names and non-tensor values (tensors as '<tensor>')."""
    if call is None:
        return ()
    return tuple((path, repr(call.constants[i]) if i in call.constants else "<tensor>")
                 for i, path in enumerate(call.paths))


def _describe_call(convention: tuple) -> str:
    return "(" + ", ".join(path if value == "<tensor>" else f"{path}={value}" for path, value in convention) + ")"


def _input_mismatch(reports: list, base: int) -> str:
    """The first difference between ranks' inputs, in words."""
    _, mine, my_convention = reports[base]
    for rank, (_, theirs, their_convention) in enumerate(reports):
        if their_convention != my_convention:
            return (f"rank {base} calls the model with {_describe_call(my_convention)} but rank {rank} with "
                    f"{_describe_call(their_convention)}; all ranks must call the model the same way (the "
                    f"same arguments, by position or keyword, and the same non-tensor values)")
        if len(theirs) != len(mine):
            return (f"rank {base} passes {len(mine)} tensors ({', '.join(p for p, _, _ in mine)}) but rank {rank} "
                    f"passes {len(theirs)} ({', '.join(p for p, _, _ in theirs)}); all ranks must call the model "
                    f"the same way")
        for (path, shape, dtype), (_, their_shape, their_dtype) in zip(mine, theirs):
            if dtype != their_dtype:
                return (f"argument {path} has dtype {dtype} on rank {base} but {their_dtype} on rank {rank}; all "
                        f"ranks must pass the same dtypes")
            if len(shape) != len(their_shape) or shape[1:] != their_shape[1:]:
                return (f"argument {path} has shape {shape} on rank {base} but {their_shape} on rank {rank}; all "
                        f"ranks must pass the same shapes")
        for (path, shape, _), (_, their_shape, _) in zip(mine, theirs):
            if shape and shape[0] != their_shape[0]:
                return (f"local batch sizes differ: argument {path} has {shape[0]} rows on rank {base} and "
                        f"{their_shape[0]} on rank {rank}; every rank must pass a local batch of the same size")
    return "the ranks' inputs differ"

