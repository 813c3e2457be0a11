"""LAMB with NVIDIA apex FusedLAMB's semantics, and BERT's parameter groups.

torch has no LAMB and no PyPI package matches apex, whose NVLAMB the NVIDIA BERT recipe was tuned with. The
step is written twice with the same math: with torch's foreach ops (any device and dtype, and the reference
for the other) and as fused Triton kernels (:mod:`bert.lamb_triton`) that run it at memory speed on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

try:
    from bert import lamb_triton
except ImportError:  # no Triton: the foreach path is the only one
    lamb_triton = None

__all__ = ["NO_DECAY_NAME_PARTS", "Lamb", "bert_param_groups"]

# Substrings of parameter names that NVIDIA's run_pretraining.py keeps out of weight decay.
NO_DECAY_NAME_PARTS = ("bias", "gamma", "beta", "LayerNorm")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 parameters get fp32 states and math, as apex's kernel does; fp64 stays fp64 so the
    # optimizer can be checked against a float64 reference.
    return torch.promote_types(dtype, torch.float32)


def _by_device_and_dtype(params: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list]:
    # A foreach call takes tensors of one device and dtype on its fast path.
    buckets: dict[tuple[torch.device, torch.dtype], list] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return buckets


def _fused_support_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take parameters of this device and dtype, or None when they can."""
    if lamb_triton is None:
        if device.type != "cuda":
            return f"the fused kernels run on CUDA tensors, and a parameter is on {device}"
        return "the fused kernels need Triton, which cannot be imported here"
    return lamb_triton.support_problem(device, dtype)


def _table_cache() -> dict:
    return lamb_triton.TableCache() if lamb_triton is not None else {}


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive Adam (NVLAMB) matching apex ``FusedLAMB`` with ``adam_w_mode=True``.

    Each step: clip all grads together to ``max_grad_norm``, take an Adam(W) update ``u = m̂/(√v̂+eps) + wd·p``
    and apply it with the per-tensor trust ratio ``lr·‖p‖/‖u‖``. Groups with ``weight_decay == 0`` get a
    plain ``lr`` (no trust ratio) unless ``use_nvlamb``, because that is what apex did for NVIDIA's BERT.

    ``max_grad_norm`` acts on the norm of the grads this optimizer holds. Under pipeline parallelism a process
    holds only part of the model, so its local norm is not the global one: hand the global norm to the step
    (``step(grad_norm=model.calc_grad_norm())`` with rannc), or pass ``max_grad_norm=0`` (or None) and clip with
    the model's ``clip_grad_norm(1.0)`` before ``step()``. The first reads the grads once for the norm and divides
    them inside the update; the second also rewrites every grad before the step reads it again. Grads are not
    modified.

    ``param_group['step']`` counts steps, incremented by ``step()`` before use as apex does, so that
    :class:`bert.schedulers.PolyWarmUpScheduler` can read it and skipped (overflowed) steps do not count.

    Compute copies (``steps_compute_copies``): a library that keeps fp32 master weights of a model computing
    in bf16 (rannc's ``param_dtype``) sets ``compute_copies`` to {master: the bf16 parameter}; a master without
    a grad of its own then takes its copy's grad (bf16, upcast in the math), and the copy gets the new value
    in the same pass that writes the master: no fp32 gradient buffer, no separate copy back.

    ``fused`` picks the implementation, per bucket of parameters of one device and dtype. None (the default)
    runs the Triton kernels of :mod:`bert.lamb_triton` wherever they apply (CUDA, Triton importable, fp32,
    bf16 or fp16 parameters with grads of the same dtype, contiguous and 16-byte aligned) and torch's
    foreach ops elsewhere, e.g. on CPU or for float64; True demands the kernels and raises where they cannot
    run; False always takes the foreach ops. Both compute the same update in fp32, agreeing to about 1e-7
    (fp16/bf16 parameters are upcast and rounded back once); the fused one reads and writes each state in
    two passes instead of many and needs no full-size temporaries.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        use_nvlamb: bool = False,
        fused: bool | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Lamb needs lr >= 0 (got lr={lr})")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb needs betas in [0, 1) (got betas={betas})")
        if eps < 0.0:
            raise ValueError(f"Lamb needs eps >= 0 (got eps={eps})")
        if weight_decay < 0.0:
            raise ValueError(f"Lamb needs weight_decay >= 0 (got weight_decay={weight_decay})")
        if max_grad_norm is not None and max_grad_norm < 0.0:
            raise ValueError(
                f"Lamb needs max_grad_norm >= 0; 0 or None disables clipping (got {max_grad_norm})"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "grad_averaging": grad_averaging,
            "use_nvlamb": use_nvlamb,
        }
        super().__init__(params, defaults)
        # Global across groups, like apex (which reads it from self.defaults), since the norm is global.
        self.max_grad_norm = max_grad_norm or 0.0
        self.fused = fused
        # Address tables of the fused kernels, re-pointed when a tensor moves (see TableCache).
        self._fused_tables = _table_cache()
        self.compute_copies: dict[torch.Tensor, torch.Tensor] = {}
        if fused:
            self._require_fused_support()

    steps_compute_copies = True

    def _require_fused_support(self) -> None:
        """Fail at construction, not at the first step, when ``fused=True`` cannot be honoured."""
        for group in self.param_groups:
            for p in group["params"]:
                problem = _fused_support_problem(p.device, p.dtype)
                if problem is not None:
                    raise ValueError(f"Lamb(fused=True): {problem}; pass fused=None to choose per device")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             grad_norm: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """One LAMB step. ``grad_norm``: the norm that clipping to ``max_grad_norm`` compares, in place of the
        norm of this optimizer's own grads: the whole model's, where this process holds only a part of it."""
        if grad_norm is not None and not self.max_grad_norm:
            raise ValueError("Lamb.step(grad_norm=...) clips by that norm, but this Lamb has max_grad_norm=0 (no "
                             "clipping): give it max_grad_norm, or leave grad_norm out")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # each parameter's gradient looked up once per step (a master's is its compute copy's)
        grads_per_group = [[(p, g) for p in group["params"] if (g := self._grad(p)) is not None]
                           for group in self.param_groups]
        clip_divisor = self._clip_divisor([g for pairs in grads_per_group for _, g in pairs], grad_norm)

        for index, (group, pairs) in enumerate(zip(self.param_groups, grads_per_group)):
            # Every group counts the step, as apex does, so group 0's counter is the optimizer's.
            group["step"] = group.get("step", 0) + 1
            for (device, dtype, grad_dtype, copy_dtype), (bucket, grads) in self._buckets(pairs).items():
                divisor = None if clip_divisor is None else clip_divisor.to(device)
                exp_avgs, exp_avg_sqs = self._states(bucket)
                copies = [self.compute_copies[p] for p in bucket] if copy_dtype is not None else []
                rows = [bucket, grads, exp_avgs, exp_avg_sqs] + ([copies] if copies else [])
                dtypes = (dtype, grad_dtype, _compute_dtype(dtype), _compute_dtype(dtype)) + (
                    (copy_dtype,) if copies else ())
                table = self._fused_table(("update", index, device, dtype, grad_dtype, copy_dtype), rows, dtypes)
                if table is not None:
                    self._update_bucket_fused(group, table, dtypes[:2] + dtypes[4:], divisor)
                else:
                    self._update_bucket(group, bucket, grads, exp_avgs, exp_avg_sqs, divisor, copies)
        return loss

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's gradient, or its compute copy's where p is a master without one of its own."""
        if p.grad is not None or not self.compute_copies:
            return p.grad
        copy = self.compute_copies.get(p)
        return None if copy is None else copy.grad

    def _buckets(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[tuple, tuple[list, list]]:
        """(parameters, their grads) by (device, dtype, grad dtype, compute copy's dtype or None): one bucket
        per kernel."""
        buckets: dict[tuple, tuple[list, list]] = {}
        copies = self.compute_copies
        for p, g in pairs:
            copy = copies.get(p) if copies else None
            params, grads = buckets.setdefault((p.device, p.dtype, g.dtype, None if copy is None else copy.dtype),
                                               ([], []))
            params.append(p)
            grads.append(g)
        return buckets

    def _fused_table(self, key: tuple, rows: list[list[torch.Tensor]], dtypes: tuple) -> lamb_triton.TensorTable | None:
        """The kernels' table for these tensors, or None when the foreach path must take them.

        ``key`` names the bucket; ``dtypes`` gives each row's required dtype. With ``fused=True`` a bucket
        the kernels cannot take is an error rather than a silent fall-back.
        """
        if self.fused is False:
            return None
        problem = _fused_support_problem(rows[0][0].device, dtypes[0])
        if problem is None:
            table, problem = self._fused_tables.lookup(key, rows, dtypes)
            if table is not None:
                return table
        if self.fused:
            raise RuntimeError(f"Lamb(fused=True) cannot step these parameters: {problem}")
        return None

    def _clip_divisor(self, grads: list[torch.Tensor], grad_norm: torch.Tensor | float | None = None
                      ) -> torch.Tensor | None:
        """Return max(1, ‖g‖/max_grad_norm) as a tensor, ‖g‖ being ``grad_norm`` where given, else the norm over
        all these grads; None when clipping is off.

        Kept on the device so that clipping needs no host sync; grads are divided by it inside the update.
        """
        if not self.max_grad_norm or not grads:
            return None
        norm_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        first_device = grads[0].device
        if grad_norm is None:
            grad_norm = self._norm(grads, first_device, norm_dtype)
        ratio = torch.as_tensor(grad_norm).to(device=first_device, dtype=norm_dtype) / self.max_grad_norm
        return torch.where(ratio > 1.0, ratio, torch.ones_like(ratio))

    def _norm(self, grads: list[torch.Tensor], device: torch.device, norm_dtype: torch.dtype) -> torch.Tensor:
        """The norm over all these grads, on `device`: one fused or foreach norm per device and dtype."""
        norms = []
        for (grad_device, dtype), bucket in _by_device_and_dtype(grads).items():
            table = self._fused_table(("grads", grad_device, dtype), [bucket], (dtype,))
            if table is not None:
                bucket_norms = lamb_triton.grad_norm(table, dtype)
            else:
                bucket_norms = torch.stack(torch._foreach_norm(bucket, dtype=_compute_dtype(dtype)))
            norms.append(bucket_norms.to(device=device, dtype=norm_dtype))
        return torch.linalg.vector_norm(torch.cat(norms))

    def _states(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each parameter's (exp_avg, exp_avg_sq), created as zeros in the compute dtype on first use."""
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self.state[p]
            if not state:
                compute_dtype = _compute_dtype(p.dtype)
                state["exp_avg"] = torch.zeros_like(p, dtype=compute_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=compute_dtype, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return exp_avgs, exp_avg_sqs

    @staticmethod
    def _bias_corrections(group: dict) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        return 1.0 - beta1 ** group["step"], 1.0 - beta2 ** group["step"]

    def _update_bucket_fused(
        self, group: dict, table: lamb_triton.TensorTable, dtypes: tuple, clip_divisor: torch.Tensor | None
    ) -> None:
        """The same step as :meth:`_update_bucket` through the Triton kernels (see bert/lamb_triton.py);
        ``dtypes``: the parameters', the grads' and the compute copies' (where there are copies)."""
        beta1, beta2 = group["betas"]
        bias_correction1, bias_correction2 = self._bias_corrections(group)
        weight_decay = float(group["weight_decay"])
        lamb_triton.lamb_update(
            table,
            dtypes,
            None if clip_divisor is None else clip_divisor.to(torch.float32).reshape(1),
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            beta3=(1.0 - beta1) if group["grad_averaging"] else 1.0,
            eps=float(group["eps"]),
            weight_decay=weight_decay,
            bias_correction1=bias_correction1,
            bias_correction2=bias_correction2,
            adapt=weight_decay != 0.0 or group["use_nvlamb"],
        )

    def _update_bucket(
        self,
        group: dict,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        clip_divisor: torch.Tensor | None,
        copies: list[torch.Tensor],
    ) -> None:
        """One LAMB step for parameters of one device and dtype (and their compute copies, given the new
        values); the math follows apex's multi_tensor_lamb."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        compute_dtype = _compute_dtype(params[0].dtype)
        upcast = params[0].dtype != compute_dtype

        work_params = [p.to(compute_dtype) for p in params] if upcast else params
        if grads[0].dtype != compute_dtype:
            grads = [g.to(compute_dtype) for g in grads]
        if clip_divisor is not None:
            grads = torch._foreach_div(grads, clip_divisor.to(compute_dtype))

        # m = β1·m + β3·g (β3 = 1-β1 with grad averaging, else 1);  v = β2·v + (1-β2)·g².
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=(1.0 - beta1) if group["grad_averaging"] else 1.0)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        bias_correction1, bias_correction2 = self._bias_corrections(group)
        # u = (m/bc1) / (sqrt(v/bc2) + eps) + wd·p, in apex's order of operations.
        denoms = torch._foreach_div(exp_avg_sqs, bias_correction2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs, bias_correction1)
        torch._foreach_div_(updates, denoms)
        del denoms
        if weight_decay != 0.0:
            torch._foreach_add_(updates, work_params, alpha=weight_decay)

        if weight_decay != 0.0 or group["use_nvlamb"]:
            param_norms = torch.stack(torch._foreach_norm(work_params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            # A zero norm (e.g. a zero-initialised weight) would make the ratio 0 or undefined: use plain lr.
            usable = (param_norms > 0) & (update_norms > 0)
            ratios = torch.where(usable, param_norms / update_norms, torch.ones_like(param_norms)) * lr
            torch._foreach_mul_(updates, list(ratios.unbind(0)))
        else:
            torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(work_params, updates)

        if upcast:
            torch._foreach_copy_(params, work_params)
        if copies:
            torch._foreach_copy_(copies, work_params)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, but keep moments in fp32 for fp16/bf16 parameters.

        torch casts loaded state to each parameter's dtype, which would round fp32 moments to fp16.
        """
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key, value in saved.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=_compute_dtype(p.dtype), copy=True)

    def __getstate__(self) -> dict:
        # torch pickles only defaults, state and groups; keep the two global settings too (not the tables,
        # which hold this process's device addresses).
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm, "fused": self.fused}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", 1.0)
        self.__dict__.setdefault("fused", None)
        self._fused_tables = _table_cache()
        self.compute_copies = {}


def bert_param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group, NVIDIA's way.

    NVIDIA excludes names containing 'bias', 'gamma', 'beta' or 'LayerNorm'. Models that name their
    LayerNorms otherwise ('layernorm', 'norm1', 'ln_f') would silently decay them, so parameters owned by a
    ``torch.nn.LayerNorm`` are excluded too. Empty groups are dropped; the decayed group comes first.
    """
    layer_norm_param_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.LayerNorm)
        for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in layer_norm_param_ids or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
