"""BERT pretraining throughput, rannc vs DDP, on the same model, batch and optimizer in one launch.

    torchrun --nproc_per_node=2 benchmarks/bert_throughput.py --config_file bert/configs/bert_large.json \
        --batch_per_gpu 64 --steps 20

The model is bert/modeling.py's BertForPreTrainingWithCriterion (loss inside), seq 128 with 20 masked
positions per sequence (phase 1), LAMB, bf16 autocast on GPUs. Its MLM head scores the masked positions
only; --full_sequence_mlm runs the seed's head over every position. Prints the rannc plan, samples/s,
peak memory per GPU and the ratio rannc / DDP, and after the timed steps a few steps timed phase by phase
(forward, backward, clipping, optimizer; each followed by a device sync) to compare with the plan's parts.

A contender `rannc:ITEM=VALUE;...` forces rannc config items (`rannc:partition_num=2`,
`rannc:partition_num=1`): the planner's choice measured against its alternatives in one launch.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rannc  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion, count_parameters  # noqa: E402
from bert.optim import Lamb, bert_param_groups  # noqa: E402
from rannc.profile.profiler import sync_device  # noqa: E402


def make_batch(config: BertConfig, batch: int, seq: int, preds: int, device, seed: int,
               full_sequence_mlm: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    positions = torch.stack([torch.randperm(seq - 1, generator=g)[:preds] + 1 for _ in range(batch)]).sort(1).values
    masked_ids = torch.randint(5, config.vocab_size, (batch, preds), generator=g)
    if full_sequence_mlm:
        mlm_targets = (torch.full((batch, seq), -1, dtype=torch.long).scatter_(1, positions, masked_ids),)
    else:
        mlm_targets = (positions, masked_ids)
    segments = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    return [t.to(device) for t in (ids, segments, torch.ones(batch, seq, dtype=torch.long), *mlm_targets,
                                   torch.randint(0, 2, (batch,), generator=g))]


def contender_items(kind: str) -> dict:
    """`rannc:partition_num=2;min_pipeline=4` -> {"partition_num": 2, "min_pipeline": 4}."""
    _, _, spec = kind.partition(":")
    items = {}
    for pair in filter(None, spec.split(";")):
        key, _, value = pair.partition("=")
        items[key] = int(value) if value.lstrip("-").isdigit() else value
    return items


def train_step(kind, wrapped, model, optimizer, batch, use_autocast, device, sync):
    """One training step; returns the loss and the milliseconds of each phase (with `sync` a device sync after
    each, so that the phases are the device's; without it they are the host's)."""
    marks = [time.perf_counter()]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        loss = wrapped(*batch)
    sync()
    marks.append(time.perf_counter())
    loss.backward()
    sync()
    marks.append(time.perf_counter())
    if kind == "rannc":
        wrapped.clip_grad_norm(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sync()
    marks.append(time.perf_counter())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    marks.append(time.perf_counter())
    return loss, [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


def run(kind: str, args, config, device, rank, world) -> dict:
    name, items = kind, contender_items(kind)
    kind = kind.split(":")[0]
    torch.manual_seed(args.seed)
    model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=args.full_sequence_mlm)
    if kind == "ddp":
        model = model.to(device)
    optimizer = Lamb(bert_param_groups(model), lr=1e-4, max_grad_norm=0)
    if kind == "rannc":
        # every step ends with zero_grad(set_to_none=True) and nothing accumulates: tell the planner
        items = {**({"partition_num": args.partition_num} if args.partition_num else {}), **items}
        wrapped = rannc.RaNNCModule(model, optimizer, accumulate_grads=False, **items)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                            if device.type == "cuda" else None)
    batch = make_batch(config, args.batch_per_gpu, args.seq, args.preds, device, args.seed + rank,
                       args.full_sequence_mlm)
    use_autocast = device.type == "cuda" and not args.no_autocast
    setup_s = None
    t_start = time.perf_counter()
    parts = (kind, wrapped, model, optimizer, batch, use_autocast, device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            dist.barrier()
            t0 = time.perf_counter()
        loss, _ = train_step(*parts, lambda: None)
        if step == 0:
            setup_s = time.perf_counter() - t_start
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    phases = [train_step(*parts, functools.partial(sync_device, device))[1] for _ in range(args.breakdown_steps)]
    breakdown = {name: round(statistics.median(p[i] for p in phases), 2)
                 for i, name in enumerate(("forward", "backward", "clip", "optimizer"))} if phases else {}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    peaks = [None] * world
    dist.all_gather_object(peaks, round(peak, 2))
    loss_value = loss.item() if kind == "rannc" else loss.detach().clone()
    if kind == "ddp":
        dist.all_reduce(loss_value)
        loss_value = loss_value.item() / world
    result = {"contender": name, "samples_per_s": args.steps * args.batch_per_gpu * world / elapsed,
              "step_ms": elapsed / args.steps * 1e3, "peak_mem_gib_per_gpu": peaks, "first_step_s": setup_s,
              "final_loss": loss_value, "breakdown_ms": breakdown}
    if kind == "rannc":
        deployment = wrapped.deployment
        result["plan"] = deployment.table()
        result["predicted_step_ms"] = deployment.predicted_step_ms
        result["predicted_over_measured_step"] = deployment.predicted_step_ms / result["step_ms"]
        result["predicted_peak_gib"] = deployment.peak_memory_bytes() / 2**30
        if peak:
            result["predicted_over_measured_peak"] = result["predicted_peak_gib"] / max(p for p in peaks if p)
    del wrapped, model, optimizer, batch, loss, parts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch_per_gpu", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--preds", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--breakdown_steps", type=int, default=3, help="steps timed phase by phase after the timed ones")
    p.add_argument("--contenders", default="rannc,ddp")
    p.add_argument("--partition_num", type=int, default=0)
    p.add_argument("--no_autocast", action="store_true")
    p.add_argument("--full_sequence_mlm", action="store_true", help="the seed's MLM head over every position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--dump_stacks_after_s", type=float, default=0,
                   help="print every thread's stack after this many seconds (to see where a run hangs)")
    args = p.parse_args()
    if args.dump_stacks_after_s:
        faulthandler.dump_traceback_later(args.dump_stacks_after_s, repeat=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = BertConfig.from_json_file(args.config_file)
    with torch.device("meta"):
        n_params = count_parameters(BertForPreTrainingWithCriterion(config))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if rank == 0:
        print(f"{args.config_file}: {n_params / 1e9:.2f} B parameters; {world} x {name}; torch {torch.__version__}; "
              f"batch {args.batch_per_gpu}/GPU, seq {args.seq}, bf16 autocast {device.type == 'cuda'}, MLM head "
              f"{'full sequence' if args.full_sequence_mlm else 'masked positions'}", flush=True)
    rows = []
    for kind in args.contenders.split(","):
        try:
            row = run(kind, args, config, device, rank, world)
        except Exception as exc:  # an OOM of one contender must not end the comparison
            row = {"contender": kind, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
            if "plan" in row:
                print(row["plan"], flush=True)
    if rank == 0:
        ok = {r["contender"]: r for r in rows if "error" not in r}
        print("| contender | samples/s | step ms | peak GiB per GPU |\n| --- | ---: | ---: | --- |")
        for r in rows:
            if "error" in r:
                print(f"| {r['contender']} | {r['error']} | | |")
            else:
                print(f"| {r['contender']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                      f"{r['peak_mem_gib_per_gpu']} |")
        if "rannc" in ok and "ddp" in ok:
            print(f"rannc / DDP = {ok['rannc']['samples_per_s'] / ok['ddp']['samples_per_s']:.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "device": name, "world": world, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
