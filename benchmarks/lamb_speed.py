"""One LAMB step at scale: bert.optim.Lamb's fused Triton path against its foreach path and torch's fused
AdamW over the same parameters, against the memory-bandwidth floor; plus a correctness check of the fused
path against the foreach path and a float64 reference.

    python benchmarks/lamb_speed.py --check                    # correctness only (CUDA, or CPU under
                                                               # TRITON_INTERPRET=1, slowly)
    python benchmarks/lamb_speed.py --params 4.9e9 --check     # check, then time on the 4.9B model's shapes

The parameters have the shapes of bert/modeling.py's model for bert/configs/bert_4.9b.json (taken in model
order up to ``--params``), in its two groups (decayed weights; biases and LayerNorms without decay). Params,
grads and states are fp32. Each optimizer is timed with CUDA events over ``--steps`` steps after
``--warmup``; the median is reported. The floor is the bytes a step cannot avoid, read p, g, m, v and
write p, m, v = 28 bytes per parameter, over ``--peak-tbs`` (4.8 TB/s, the H200's datasheet figure); a
device-to-device copy's measured rate is printed beside it. A contender that runs out of memory at full
size is timed on ``--fallback-params`` and its time scaled by the parameter count (marked in the table).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from bert.optim import Lamb, bert_param_groups, lamb_triton  # noqa: E402

BYTES_FLOOR = 28  # read p, g, m, v; write p, m, v (fp32)


# ---------------------------------------------------------------- correctness


def reference_lamb(groups, grads_per_step, lr, betas, eps, max_grad_norm, grad_averaging, bias_correction):
    """apex FusedLAMB (adam_w_mode), one tensor at a time in float64. ``groups``: (params, wd, use_nvlamb)."""
    beta1, beta2 = betas
    flat = [(p.detach().double().clone(), wd, nv) for params, wd, nv in groups for p in params]
    params = [p for p, _, _ in flat]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        clip = norm / max_grad_norm if max_grad_norm and norm > max_grad_norm else 1.0
        bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        for i, ((p, wd, nvlamb), g) in enumerate(zip(flat, grads)):
            g = g.double() / clip
            m[i] = beta1 * m[i] + ((1 - beta1) if grad_averaging else 1.0) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps) + wd * p
            ratio = lr
            if wd != 0 or nvlamb:
                p_norm, u_norm = float(p.norm()), float(update.norm())
                if p_norm > 0 and u_norm > 0:
                    ratio = lr * p_norm / u_norm
            p -= ratio * update
    return params


def check_case(device, dtype, max_grad_norm, steps=4, **options):
    """Run fused, foreach and the float64 reference on odd shapes; return the worst relative errors."""
    gen = torch.Generator().manual_seed(0)
    chunk, block = lamb_triton.CHUNK, lamb_triton.BLOCK
    shapes = [(2 * chunk + block + 3,), (block,), (37, 129), (1,), (5,), (block + 1,), (3, 3), (chunk - 1,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    base[4].zero_()  # a zero weight with decay: ‖p‖ = 0, the ratio falls back to lr
    # (tensors, weight decay, nvlamb): decayed; plain no-decay; nvlamb without decay (one tensor gets zero grads)
    layout = [([0, 1, 2, 4], 0.01, False), ([3, 5], 0.0, False), ([6, 7], 0.0, True)]
    grads = [[3.0 * torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    for step_grads in grads:
        step_grads[6].zero_()  # ‖u‖ = 0 under nvlamb without decay: the ratio must not become 0/0

    def run(fused):
        # Copies: on CPU .to() would hand back the base tensors themselves and the runs would share them.
        params = [torch.nn.Parameter(b.to(device=device, dtype=dtype, copy=True)) for b in base]
        groups = [{"params": [params[i] for i in idx], "weight_decay": wd, "use_nvlamb": nv} for idx, wd, nv in layout]
        opt = Lamb(groups, lr=0.02, max_grad_norm=max_grad_norm, fused=fused, **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device=device, dtype=dtype, copy=True)
            kept = [p.grad.clone() for p in params]
            opt.step()
            assert all(torch.equal(k, p.grad) for k, p in zip(kept, params)), "the step modified a grad"
        assert bool(opt._fused_tables) == (fused is not False), "the wrong path ran"
        return [p.detach().double().cpu() for p in params]

    fused, fused_again, foreach = run(None), run(None), run(False)
    order = [i for idx, _, _ in layout for i in idx]
    ref_groups = [([base[i].to(dtype).double() for i in idx], wd, nv) for idx, wd, nv in layout]
    ref_grads = [[step_grads[i].to(dtype).double() for i in order] for step_grads in grads]
    ref_flat = reference_lamb(ref_groups, ref_grads, 0.02, options.get("betas", (0.9, 0.999)), 1e-6, max_grad_norm,
                              options.get("grad_averaging", True), options.get("bias_correction", True))
    reference = [None] * len(base)
    for i, r in zip(order, ref_flat):
        reference[i] = r

    start = [b.to(dtype).double() for b in base]
    moved = [r - s for r, s in zip(reference, start)]
    # Each tensor's error over the size of its values before and after, so that a parameter that crosses
    # zero does not turn rounding into a large relative error.
    scales = [max(float(r.abs().max()), float(s.abs().max()), 1e-30) for r, s in zip(reference, start)]

    def rel(a, b, scale=scales):
        return max(float((x - y).abs().max()) / z for x, y, z in zip(a, b, scale))

    return {
        "fused_vs_ref": rel(fused, reference),
        "foreach_vs_ref": rel(foreach, reference),
        "fused_vs_foreach": rel(fused, foreach),
        "fused_update_vs_ref": rel([f - s for f, s in zip(fused, start)], moved,
                                   [max(float(m.abs().max()), 1e-30) for m in moved]),
        "deterministic": all(torch.equal(a, b) for a, b in zip(fused, fused_again)),
    }


def run_checks(device) -> bool:
    cases = [
        ("fp32, clipping triggers", torch.float32, 1.0, {}),
        ("fp32, no clipping", torch.float32, 0.0, {}),
        ("fp32, plain sums", torch.float32, 1.0, {"bias_correction": False, "grad_averaging": False}),
        ("bf16 params", torch.bfloat16, 1.0, {}),
    ]
    print(f"check on {device}: max over tensors of max|x - y| / max(|p before|, |p after|); 'plain sums' has no")
    print("bias correction and no grad averaging")
    print("| case | fused vs f64 | foreach vs f64 | fused vs foreach | fused update vs f64's | deterministic | ok |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    all_ok = True
    for name, dtype, max_grad_norm, options in cases:
        r = check_case(device, dtype, max_grad_norm, **options)
        if dtype == torch.float32:
            ok = r["fused_vs_ref"] < 1e-6 and r["fused_vs_foreach"] < 1e-6 and r["fused_update_vs_ref"] < 1e-4
        else:  # one bf16 rounding of the new parameter: within an ulp of the foreach result
            ok = r["fused_vs_foreach"] <= 2.0**-7
        ok = ok and r["deterministic"]
        all_ok &= ok
        # bf16 rounds every new parameter, which swamps a step's update: that comparison says nothing there.
        update = f"{r['fused_update_vs_ref']:.2e}" if dtype == torch.float32 else "n/a"
        print(f"| {name} | {r['fused_vs_ref']:.2e} | {r['foreach_vs_ref']:.2e} | {r['fused_vs_foreach']:.2e} | "
              f"{update} | {r['deterministic']} | {'yes' if ok else 'NO'} |")
    return all_ok


# ---------------------------------------------------------------- timing


def model_shapes(config_file: str, limit: float) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, decayed) for the model's trainable parameters in model order, up to ``limit`` elements."""
    config = BertConfig.from_json_file(config_file)
    with torch.device("meta"):
        model = BertForPreTrainingWithCriterion(config)
    decayed = {id(p) for p in bert_param_groups(model)[0]["params"]}
    shapes, total = [], 0
    for p in model.parameters():
        if p.requires_grad and total < limit:
            shapes.append((tuple(p.shape), id(p) in decayed))
            total += p.numel()
    return shapes


def make_params(shapes, device) -> list[dict]:
    """The two parameter groups with random fp32 params and grads (grads scaled so that clipping triggers)."""
    decay, no_decay = [], []
    for shape, decayed in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device).normal_(0.0, 0.02))
        p.grad = torch.empty(shape, device=device).normal_(0.0, 1e-3)
        (decay if decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def time_optimizer(make_optimizer, shapes, device, args) -> float:
    groups = make_params(shapes, device)
    optimizer = make_optimizer(groups)
    try:
        return time_steps(optimizer.step, args.warmup, args.steps)
    finally:
        del optimizer, groups
        torch.cuda.empty_cache()


class _Call:
    """An object with a ``step()`` that runs ``fn``, to time a piece of a step like an optimizer."""

    def __init__(self, fn, owner) -> None:
        self.step, self.owner = fn, owner


def clip_norm_only(groups) -> _Call:
    """The fused path's global gradient norm and clip divisor, alone."""
    optimizer = Lamb(groups, lr=1e-3, max_grad_norm=1.0)
    grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
    return _Call(lambda: optimizer._clip_divisor(grads), optimizer)


def no_trust_ratio(groups) -> Lamb:
    """Every tensor without decay or nvlamb: pass 1 applies p -= lr·u itself, one pass of 28 B/param."""
    return Lamb([{"params": [p for group in groups for p in group["params"]], "weight_decay": 0.0}], lr=1e-3,
                max_grad_norm=0)


def copy_rate_tbs(device, gigabytes: float = 4.0) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    n = int(gigabytes * 1e9 / 4)
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = time_steps(lambda: dst.copy_(src), 3, 20)
    return 2 * n * 4 / (ms * 1e-3) / 1e12


def run_timing(args) -> None:
    device = torch.device(args.device)
    shapes = model_shapes(args.config_file, args.params)
    n = sum(math.prod(s) for s, _ in shapes)
    floor_ms = BYTES_FLOOR * n / (args.peak_tbs * 1e12) * 1e3
    copy_tbs = copy_rate_tbs(device)
    torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}; {n / 1e9:.3f}B fp32 params in "
          f"{len(shapes)} tensors; floor {floor_ms:.1f} ms (28 B/param at {args.peak_tbs} TB/s); "
          f"a device copy moves {copy_tbs:.2f} TB/s (28 B/param at that rate: "
          f"{BYTES_FLOOR * n / (copy_tbs * 1e12) * 1e3:.1f} ms)")

    contenders = [
        ("Lamb fused, clipping in the step", 44, lambda g: Lamb(g, lr=1e-3, max_grad_norm=1.0)),
        ("Lamb fused, max_grad_norm=0 (as bert/pretrain.py)", 40, lambda g: Lamb(g, lr=1e-3, max_grad_norm=0)),
        ("torch AdamW(fused=True)", 28, lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True)),
        ("Lamb foreach, clipping in the step", None, lambda g: Lamb(g, lr=1e-3, max_grad_norm=1.0, fused=False)),
        # Pieces of the fused step, to see where its time goes:
        ("  piece: fused clip norm alone (reads g)", 4, clip_norm_only),
        ("  piece: fused one-pass step, no trust ratio anywhere (not LAMB)", 28, no_trust_ratio),
    ]
    rows = []
    for name, design_bytes, make in contenders:
        ms, note = None, ""
        try:
            ms = time_optimizer(make, shapes, device, args)
        except torch.OutOfMemoryError:
            pass  # retried below, once the exception no longer holds the full-size tensors
        except Exception as error:  # one broken contender should not hide the others' figures
            print(f"{name}: {type(error).__name__}: {error}")
            continue
        if ms is None:
            gc.collect()
            torch.cuda.empty_cache()
            small = model_shapes(args.config_file, args.fallback_params)
            small_n = sum(math.prod(s) for s, _ in small)
            ms = time_optimizer(make, small, device, args) * n / small_n
            note = f" (timed on {small_n / 1e9:.2f}B, scaled)"
        rows.append((name + note, design_bytes, ms))
    for block, num_warps in args.sweep:
        from rannc.kernels import multi_tensor  # with Triton only, as the sweep

        # the LAMB kernels' and the clipping norm's settings alike
        lamb_triton.BLOCK, lamb_triton.NUM_WARPS = block, num_warps
        multi_tensor.BLOCK, multi_tensor.NUM_WARPS = block, num_warps
        ms = time_optimizer(lambda g: Lamb(g, lr=1e-3, max_grad_norm=1.0), shapes, device, args)
        rows.append((f"Lamb fused, clipping, BLOCK={block} num_warps={num_warps}", 44, ms))

    print("\n| optimizer step | ms (median) | x floor | design bytes/param | TB/s of design bytes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, design_bytes, ms in rows:
        rate = f"{design_bytes * n / (ms * 1e-3) / 1e12:.2f}" if design_bytes else "-"
        print(f"| {name} | {ms:.1f} | {ms / floor_ms:.2f} | {design_bytes or '-'} | {rate} |")
    print(f"| floor: 28 B/param at {args.peak_tbs} TB/s | {floor_ms:.1f} | 1.00 | 28 | {args.peak_tbs:.2f} |")


def parse_sweep(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="check fused against foreach and float64 first")
    p.add_argument("--params", type=float, default=0.0, help="time a step over this many parameters (0: no timing)")
    p.add_argument("--fallback-params", type=float, default=1.2e9)
    p.add_argument("--config_file", default="bert/configs/bert_4.9b.json")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tbs", type=float, default=4.8)
    p.add_argument("--sweep", type=parse_sweep, default=[], help="extra fused configs, e.g. 1024x4,4096x8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if lamb_triton is None:
        sys.exit("the fused path needs Triton, which cannot be imported here")
    ok = True
    if args.check:
        ok = run_checks(torch.device(args.device))
    if args.params:
        run_timing(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
