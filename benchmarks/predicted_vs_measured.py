"""The planner's predicted step against the measured one, for RaNNC's tutorial MLP cut into pipeline stages,
under each schedule, in one launch:

    torchrun --nproc_per_node=2 benchmarks/predicted_vs_measured.py --schedules gpipe,1f1b --partition_num 2
    torchrun --nproc_per_node=2 benchmarks/predicted_vs_measured.py \
        --schedules gpipe,1f1b,interleaved_1f1b:2,zb_h1,auto:2     # NAME:V = V pieces per rank

Each rank runs one thread on the CPU (profiling and training alike), so that two ranks on two cores measure
what they were profiled at. A step is what a training loop does: forward, backward, clipping by the global
norm and the optimizer step. Every contender plans on one profile (measured once in the launch), and the
steps are timed in turns over the contenders (--steps_per_turn steps each after an untimed one, so that a
contender's caches are warm), so that the machine's drift reaches every contender alike; each turn starts one
contender later than the one before, so that no contender always runs after the same one. Prints one row per
schedule: plan, predicted and measured ms (median and quartiles), their ratio; for `auto` whether it chose
the fastest measured, and against each other contender, turn by turn, whether it is slower beyond the noise
(`paired_verdict`: schedules a few percent apart on two shared cores are not told apart by their medians alone).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rannc  # noqa: E402
from examples.tutorial import Net  # noqa: E402


def deploy(spec: str, args, device, cache_dir: str):
    """One contender's RaNNCModule, deployed by a first step, with its optimizer and local batch."""
    schedule, _, virtual = spec.partition(":")
    torch.manual_seed(0)
    model = Net(args.hidden, args.layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    wrapped = rannc.RaNNCModule(model, optimizer, schedule=schedule, virtual_stages=int(virtual or 1),
                                partition_num=args.partition_num, accumulate_grads=False,
                                min_pipeline=args.microbatches, max_pipeline=args.microbatches,
                                profile_cache_dir=cache_dir)
    local = args.batch // rannc.get_world_size()
    batch = (torch.randn(local, args.hidden, device=device), torch.randn(local, args.hidden, device=device))
    contender = (wrapped, optimizer, batch)
    timed_step(contender, device)
    return contender


def timed_step(contender, device) -> float:
    """One training step (forward, backward, clipping, optimizer) between barriers, in ms."""
    wrapped, optimizer, batch = contender
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    loss = wrapped(*batch)
    loss.backward()
    wrapped.clip_grad_norm(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return (time.perf_counter() - t0) * 1e3


def row(spec: str, contender, times: list[float]) -> dict:
    d = contender[0].deployment
    measured = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4)
    return {"asked": spec, "schedule": d.schedule, "stages": d.pipeline_depth, "virtual_stages": d.virtual_stages,
            "microbatches": d.microbatch_count, "actions_per_rank": 2 * d.microbatch_count * d.virtual_stages
            + (d.microbatch_count if d.schedule == "zb_h1" else 0),
            "predicted_ms": round(d.predicted_step_ms, 3), "measured_ms": round(measured, 3),
            "measured_quartiles_ms": [round(q, 3) for q in (quartiles[0], quartiles[2])],
            "predicted_over_measured": round(d.predicted_step_ms / measured, 3),
            "bubble": round(d.bubble_fraction, 3)}


def paired_verdict(mine: list[list[float]], theirs: list[list[float]], other: str, draws: int = 2000) -> dict:
    """One contender against another, turn by turn: the ratio of their median step times within each turn (both
    ran in the same few seconds, so the machine's drift cancels), the median ratio over the turns, and a 95%
    bootstrap interval of that median (turns drawn with replacement, seeded). An interval wholly above 1 says
    `mine` is slower beyond the noise; one that holds 1 says the measurement cannot tell the two apart."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(mine, theirs) if a and b]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(draws))
    return {"other": other, "ratio": round(statistics.median(ratios), 4), "turns": len(ratios),
            "ci95": [round(medians[int(0.025 * draws)], 4), round(medians[int(0.975 * draws) - 1], 4)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--partition_num", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--steps_per_turn", type=int, default=2,
                   help="timed steps of one contender before the next one's turn (after one untimed step)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # One profile for every contender (the first profiles, the others read it), so that the predictions
    # differ only by the plan; steps timed in turns over the contenders.
    rannc.dist.init()
    cache_dir = [tempfile.mkdtemp(prefix="rannc_profiles_") if rannc.get_rank() == 0 else None]
    dist.broadcast_object_list(cache_dir, 0)
    specs = args.schedules.split(",")
    contenders = [deploy(spec, args, device, cache_dir[0]) for spec in specs]
    turns = -(-args.steps // args.steps_per_turn)
    per_turn: list[list[list[float]]] = [[[] for _ in range(turns)] for _ in specs]
    for turn in range(turns):
        for k in [(turn + i) % len(contenders) for i in range(len(contenders))]:
            for step in range(args.steps_per_turn + 1):   # the first step of a turn warms the caches up
                ms = timed_step(contenders[k], device)
                if step and turn * args.steps_per_turn + step <= args.steps:
                    per_turn[k][turn].append(ms)
    times = [[ms for turn in turns_of for ms in turn] for turns_of in per_turn]
    rows = [row(spec, contender, t) for spec, contender, t in zip(specs, contenders, times)]
    if rannc.get_rank() == 0:
        shutil.rmtree(cache_dir[0], ignore_errors=True)
        for r in rows:
            print(json.dumps(r), flush=True)
        fastest = min(rows, key=lambda r: r["measured_ms"])
        for k, r in enumerate(rows):
            if r["asked"].startswith("auto"):
                print(f"{r['asked']} chose {r['schedule']} (v={r['virtual_stages']}): measured {r['measured_ms']} ms, "
                      f"the fastest measured {fastest['asked']} {fastest['measured_ms']} ms "
                      f"({r['measured_ms'] / fastest['measured_ms']:.3f}x)", flush=True)
                verdicts = [paired_verdict(per_turn[k], per_turn[j], other["asked"])
                            for j, other in enumerate(rows) if j != k]
                r["against_others"] = verdicts
                slower = [v for v in verdicts if v["ci95"][0] > 1.0]
                print(f"{r['asked']} against each other contender, turn by turn (its time / theirs, median and 95% "
                      f"interval over the turns): " + "; ".join(f"{v['other']} {v['ratio']:.3f} "
                                                               f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                                                               for v in verdicts), flush=True)
                print(f"{r['asked']}: " + (f"slower beyond the noise than {', '.join(v['other'] for v in slower)}"
                                           if slower else "no contender measured faster beyond the noise"),
                      flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
