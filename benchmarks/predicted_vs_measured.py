"""The planner's predicted step against the measured one, for RaNNC's tutorial MLP cut into pipeline stages,
under each schedule, in one launch:

    torchrun --nproc_per_node=2 benchmarks/predicted_vs_measured.py --schedules gpipe,1f1b --partition_num 2
    torchrun --nproc_per_node=2 benchmarks/predicted_vs_measured.py \
        --schedules gpipe,1f1b,interleaved_1f1b:2,zb_h1,auto:2     # NAME:V = V pieces per rank

Each rank runs one thread on the CPU (profiling and training alike), so that two ranks on two cores measure
what they were profiled at. A step is what a training loop does: forward, backward, clipping by the global
norm and the optimizer step. Prints one row per schedule: plan, predicted and measured ms, their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rannc  # noqa: E402
from examples.tutorial import Net  # noqa: E402


def measure(spec: str, args, device) -> dict:
    schedule, _, virtual = spec.partition(":")
    torch.manual_seed(0)
    model = Net(args.hidden, args.layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    wrapped = rannc.RaNNCModule(model, optimizer, schedule=schedule, virtual_stages=int(virtual or 1),
                                partition_num=args.partition_num, accumulate_grads=False,
                                min_pipeline=args.microbatches, max_pipeline=args.microbatches,
                                profile_cache_dir="")
    local = args.batch // rannc.get_world_size()
    x = torch.randn(local, args.hidden, device=device)
    target = torch.randn(local, args.hidden, device=device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        loss = wrapped(x, target)
        loss.backward()
        wrapped.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    d = wrapped.deployment
    measured = statistics.median(times)
    return {"asked": spec, "schedule": d.schedule, "stages": d.pipeline_depth, "virtual_stages": d.virtual_stages,
            "microbatches": d.microbatch_count,
            "predicted_ms": round(d.predicted_step_ms, 3), "measured_ms": round(measured, 3),
            "predicted_over_measured": round(d.predicted_step_ms / measured, 3),
            "bubble": round(d.bubble_fraction, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--partition_num", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = [measure(schedule, args, device) for schedule in args.schedules.split(",")]
    if rannc.get_rank() == 0:
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
