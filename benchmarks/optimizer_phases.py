"""Clipping's and LAMB's phases on a model's parameter shapes, with synthetic tensors (no model, no backward):
what the phases cost on their own, to compare with a training step's phases.

    python benchmarks/optimizer_phases.py --config_file bert/configs/bert_4.9b.json

Clipping: torch's foreach norm (in fp32) and foreach scale over fp32 and over bf16 gradients, and, on CUDA,
bert.lamb_triton's one-launch sum of squares. LAMB: ``Lamb.step`` over fp32 masters whose bf16 compute copies
hold the grads (rannc's ``param_dtype``) and over fp32 parameters with fp32 grads, for several kernel settings
(chunk, block, warps), each as the device's time between syncs and the host's time alone (the device kept busy
by a sleep kernel, so the host's issuing is what the clock sees).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.clip_speed import median_ms  # noqa: E402
from bert import lamb_triton  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from bert.optim import Lamb  # noqa: E402

# (chunk, block, warps); the first is bert.lamb_triton's default
REPEATS = 5
KERNEL_SETTINGS = [(65536, 2048, 8), (65536, 4096, 8), (65536, 1024, 4), (262144, 2048, 8), (65536, 4096, 16),
                   (16384, 1024, 4)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_ms(fn, device: torch.device) -> float:
    sync(device)
    if device.type == "cuda":
        torch.cuda._sleep(int(2e9))   # the device busy for a while: fn's issuing is all the clock sees
    t0 = time.perf_counter()
    fn()
    elapsed = 1e3 * (time.perf_counter() - t0)
    sync(device)
    return round(elapsed, 2)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def clipping(shapes, device: torch.device, dtype: torch.dtype) -> dict:
    grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    coef = torch.tensor(0.5, device=device, dtype=dtype)
    row = {"grads_gb": round(sum(g.numel() for g in grads) * grads[0].element_size() / 1e9, 2),
           "foreach_norm_ms": round(median_ms(lambda: torch.linalg.vector_norm(
               torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))), device, REPEATS), 2),
           "foreach_scale_ms": round(median_ms(lambda: torch._foreach_mul_(grads, coef), device, REPEATS), 2)}
    if device.type == "cuda":
        table = lamb_triton.TensorTable([grads])
        row["triton_norm_ms"] = round(median_ms(lambda: lamb_triton.grad_norm(table, dtype), device, REPEATS), 2)
    return row


def lamb(shapes, device: torch.device, copy_dtype: torch.dtype | None, settings) -> dict:
    torch.manual_seed(0)
    masters = [torch.randn(s, device=device) * 0.02 for s in shapes]
    groups = [{"params": [m for m in masters if m.dim() > 1], "weight_decay": 0.01},
              {"params": [m for m in masters if m.dim() <= 1], "weight_decay": 0.0}]
    copies = {}
    for m in masters:
        if copy_dtype is None:
            m.grad = torch.randn_like(m)
        else:
            copies[m] = m.to(copy_dtype)
            copies[m].grad = torch.randn_like(copies[m])
    rows = {}
    default_chunk = lamb_triton.TensorTable.__init__.__defaults__
    defaults = (lamb_triton.BLOCK, lamb_triton.NUM_WARPS)
    try:
        for chunk, block, warps in settings:
            lamb_triton.TensorTable.__init__.__defaults__ = (chunk, None)
            lamb_triton.BLOCK, lamb_triton.NUM_WARPS = block, warps
            optimizer = Lamb(groups, lr=1e-4, max_grad_norm=0)
            optimizer.compute_copies = copies
            optimizer.step()   # states, tables, the kernels' compilation
            rows[f"chunk {chunk}, block {block}, warps {warps}"] = {
                "step_ms": round(median_ms(optimizer.step, device, REPEATS), 2),
                "host_ms": host_ms(optimizer.step, device)}
            del optimizer
            free(device)
    finally:
        lamb_triton.TensorTable.__init__.__defaults__ = default_chunk
        lamb_triton.BLOCK, lamb_triton.NUM_WARPS = defaults
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_4.9b.json")
    args = p.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with torch.device("meta"):
        shapes = [p.shape for p in BertForPreTrainingWithCriterion(BertConfig.from_json_file(args.config_file))
                  .parameters()]
    print(json.dumps({"tensors": len(shapes), "parameters": sum(s.numel() for s in shapes)}), flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        print(json.dumps({"clipping": str(dtype), **clipping(shapes, device, dtype)}), flush=True)
        free(device)
    settings = KERNEL_SETTINGS if device.type == "cuda" else KERNEL_SETTINGS[:1]
    for copy_dtype, label in ((torch.bfloat16, "fp32 masters, bf16 compute copies"), (None, "fp32")):
        print(json.dumps({"lamb": label, **lamb(shapes, device, copy_dtype, settings[:6 if copy_dtype else 3])}),
              flush=True)
        free(device)


if __name__ == "__main__":
    main()
