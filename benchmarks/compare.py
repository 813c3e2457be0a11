"""Throughput of rannc against DDP, FSDP2 and a hand-split 1F1B pipeline, on the same transformer models.

One launch measures every contender on every model size, with the same seed, data and global batch:

    torchrun --nproc_per_node=2 benchmarks/compare.py --models large,2.5b --out results.json
    torchrun --nproc_per_node=2 benchmarks/compare.py --models tiny --steps 2 --warmup 1   # CPU check (gloo)

A contender that fails (out of memory, an unsupported API) becomes an "error" row and the run goes on.
A failure on one rank only can leave the other rank waiting in a collective; the group's timeout
(--timeout-s) then ends the run, and --out already holds every row measured before.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rannc  # noqa: E402

BASELINES = ("ddp", "fsdp2", "1f1b")
CONTENDERS = ("rannc", "rannc-2stage", "rannc-memlimit") + BASELINES
LABELS = {"rannc": "rannc", "rannc-2stage": "rannc 2 stages", "rannc-memlimit": "rannc mem_limit",
          "ddp": "DDP", "fsdp2": "FSDP2", "1f1b": "1F1B hand split"}


# ---- models --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    vocab: int = 30528
    seq: int = 128
    batch_per_gpu: int = 64       # default local batch


SIZES = {
    "tiny": ModelSize(hidden=64, layers=2, heads=2, vocab=1000, seq=32, batch_per_gpu=8),
    "large": ModelSize(hidden=1024, layers=24, heads=16, batch_per_gpu=64),    # BERT-large
    "2.5b": ModelSize(hidden=2048, layers=48, heads=32, batch_per_gpu=16),
}


class EncoderLM(nn.Module):
    """Token embedding, pre-norm encoder layers, final LayerNorm, vocabulary projection; the loss inside."""

    def __init__(self, size: ModelSize):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(size.hidden, size.heads, 4 * size.hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(size.layers))
        self.norm = nn.LayerNorm(size.hidden)
        self.proj = nn.Linear(size.hidden, size.vocab)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return lm_loss(self.proj(self.norm(h)), labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class FirstHalf(nn.Module):
    """Pipeline stage 0: the embedding and the first half of the layers."""

    def __init__(self, model: EncoderLM, cut: int):
        super().__init__()
        self.embed = model.embed
        self.layers = nn.ModuleList(model.layers[:cut])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return h


class SecondHalf(nn.Module):
    """Pipeline stage 1: the second half of the layers, the final norm and the projection (the schedule's
    loss_fn applies the loss)."""

    def __init__(self, model: EncoderLM, cut: int):
        super().__init__()
        self.layers = nn.ModuleList(model.layers[cut:])
        self.norm = model.norm
        self.proj = model.proj

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.proj(self.norm(h))


def flops_per_sample(size: ModelSize, nonembedding_params: int) -> float:
    """Training FLOPs of one sample: 6 N T + 12 L H S T (N counts the vocabulary projection)."""
    return size.seq * (6 * nonembedding_params + 12 * size.layers * size.hidden * size.seq)


# ---- the run's shared state ----------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    world_group: Any              # all ranks, for DDP and FSDP2 (the backend of the run)
    control: Any                  # gloo group: agreeing on outcomes even when NCCL is in trouble
    pipe_group: Any = None        # this rank's two-stage pipeline
    pipe_dp_group: Any = None     # the same stage of every pipeline replica (world > 2)
    nonembedding: dict[str, int] = dataclasses.field(default_factory=dict)  # model -> parameters in 6 N T

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.cuda and not self.args.no_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def adam(self, params) -> torch.optim.Optimizer:
        if self.cuda:
            return torch.optim.Adam(params, lr=1e-4, fused=True)
        return torch.optim.Adam(params, lr=1e-4)

    def build(self, size: ModelSize, on: torch.device | None = None) -> EncoderLM:
        """A fresh model with the run's seed, built directly on `on` (default: this rank's device)."""
        torch.manual_seed(self.args.seed)
        with torch.device(on or self.device):
            return EncoderLM(size)


def init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """The default group (NCCL with one GPU per rank when CUDA is present, gloo otherwise). Also runs as a
    plain single process."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return rank, world, device


def make_groups(ctx: Context) -> None:
    """Every rank creates every group, in the same order (new_group is collective)."""
    ranks = list(range(ctx.world))
    ctx.world_group = dist.new_group(ranks)
    ctx.control = dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=ctx.args.timeout_s))
    if ctx.world >= 2 and ctx.world % 2 == 0:
        for replica in range(ctx.world // 2):
            group = dist.new_group([2 * replica, 2 * replica + 1])
            if ctx.rank // 2 == replica:
                ctx.pipe_group = group
        if ctx.world > 2:
            for stage in range(2):
                group = dist.new_group(ranks[stage::2])
                if ctx.rank % 2 == stage:
                    ctx.pipe_dp_group = group


# ---- contenders: each builds its training step; measure() runs and times it -----------------------------
@dataclasses.dataclass
class Trainer:
    step: Callable[[], None]
    plan: str                                # how the work is laid out, for the table
    after_first_step: Callable[[], dict] | None = None   # extra facts known once the first step ran


def rannc_trainer(ctx: Context, size: ModelSize, batch: Batch, **items: Any) -> Trainer:
    on = torch.device("cpu") if ctx.args.rannc_build_on == "cpu" else ctx.device
    model = ctx.build(size, on)
    optimizer = ctx.adam(model.parameters())
    wrapped = rannc.RaNNCModule(model, optimizer, **items)
    ids, labels = batch.local_ids, batch.local_labels

    def step() -> None:
        with ctx.autocast():
            loss = wrapped(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def facts() -> dict:
        d = wrapped.deployment
        if ctx.rank == 0:
            print(f"rannc deployment ({', '.join(f'{k}={v}' for k, v in items.items()) or 'default config'}):\n"
                  f"{d.table()}", flush=True)
        stages = [{"ranks": s.ranks, "blocks": [s.first_block, s.end_block], "recompute": s.recompute}
                  for s in d.stages]
        recompute = "y" if all(s.recompute for s in d.stages) else (
            "n" if not any(s.recompute for s in d.stages) else "".join("y" if s.recompute else "n" for s in d.stages))
        plan = (f"{len(d.stages)} stage(s) x {d.replicas} replica(s), {d.microbatch_count} mb, recompute {recompute}, "
                f"predicted {d.predicted_step_ms:.0f} ms")
        return {"plan": plan, "predicted_step_ms": d.predicted_step_ms, "microbatch_count": d.microbatch_count,
                "stages": stages, "config": items}

    return Trainer(step, "rannc", facts)


def _plain_step(ctx: Context, model, optimizer, batch: Batch):
    """One training step of a model that every rank runs on its local batch (DDP, FSDP2)."""
    ids, labels = batch.local_ids, batch.local_labels

    def step() -> None:
        with ctx.autocast():
            loss = model(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ddp_trainer(ctx: Context, size: ModelSize, batch: Batch) -> Trainer:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(ctx.build(size), device_ids=[ctx.device.index] if ctx.cuda else None,
                process_group=ctx.world_group)
    optimizer = ctx.adam(model.parameters())
    step = _plain_step(ctx, model, optimizer, batch)
    return Trainer(step, f"{ctx.world} replicas")


def fsdp2_trainer(ctx: Context, size: ModelSize, batch: Batch) -> Trainer:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError as exc:
            raise Skip(f"FSDP2 (fully_shard) is missing in torch {torch.__version__}: {exc}") from None
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(ctx.world_group, ctx.device.type)
    model = ctx.build(size)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = ctx.adam(model.parameters())
    step = _plain_step(ctx, model, optimizer, batch)
    return Trainer(step, f"{ctx.world} shards, fp32 params")


def pipeline_trainer(ctx: Context, size: ModelSize, batch: Batch) -> Trainer:
    """The model cut in half by hand: torch.distributed.pipelining with Schedule1F1B. Pairs of ranks form
    pipelines; with more than one pair, each stage's gradients are averaged over the pairs."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    if ctx.pipe_group is None:
        raise Skip(f"needs an even number of ranks, got {ctx.world}")
    stage_index, replicas = ctx.rank % 2, ctx.world // 2
    n_micro = ctx.args.microbatches
    rows = batch.global_ids.shape[0] // replicas
    if rows % n_micro:
        raise Skip(f"a pipeline's batch of {rows} does not split into {n_micro} micro-batches")
    full = ctx.build(size)
    cut = size.layers // 2
    module = FirstHalf(full, cut) if stage_index == 0 else SecondHalf(full, cut)
    del full                      # the other half's tensors are freed with it
    if ctx.cuda:
        torch.cuda.empty_cache()
    stage = PipelineStage(module, stage_index, 2, ctx.device, group=ctx.pipe_group)
    schedule = Schedule1F1B(stage, n_microbatches=n_micro, loss_fn=lm_loss)
    optimizer = ctx.adam(module.parameters())
    mine = slice(ctx.rank // 2 * rows, (ctx.rank // 2 + 1) * rows)
    ids, labels = batch.global_ids[mine], batch.global_labels[mine]
    step_kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        with ctx.autocast():
            if stage_index == 0:
                schedule.step(ids, **step_kwargs)
            else:
                schedule.step(target=labels, losses=[], **step_kwargs)
        if ctx.pipe_dp_group is not None:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=ctx.pipe_dp_group)
                    p.grad.div_(replicas)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plan = f"2 stages x {replicas} replica(s), {n_micro} mb of {rows // n_micro}"
    return Trainer(step, plan)


class Skip(Exception):
    """The contender cannot run here (a missing API, an unsuitable world size); not a failure."""


@dataclasses.dataclass
class Batch:
    global_ids: torch.Tensor
    global_labels: torch.Tensor
    local_ids: torch.Tensor
    local_labels: torch.Tensor


def make_batch(ctx: Context, size: ModelSize, batch_per_gpu: int) -> Batch:
    """The same global batch on every rank (random tokens and labels); rank r's local batch is part r."""
    g = torch.Generator().manual_seed(ctx.args.seed + 1)
    rows = batch_per_gpu * ctx.world
    ids = torch.randint(size.vocab, (rows, size.seq), generator=g).to(ctx.device)
    labels = torch.randint(size.vocab, (rows, size.seq), generator=g).to(ctx.device)
    mine = slice(ctx.rank * batch_per_gpu, (ctx.rank + 1) * batch_per_gpu)
    return Batch(ids, labels, ids[mine], labels[mine])


# ---- measuring ------------------------------------------------------------------------------------------
def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    dist.barrier(group=ctx.control)


def max_over_ranks(ctx: Context, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control)
    return float(t.item())


def measure(ctx: Context, trainer: Trainer, warmup: int, steps: int) -> dict:
    """Seconds of the first step (rannc deploys in it), then the timed steps after the warm-up."""
    sync(ctx)
    t0 = time.perf_counter()
    trainer.step()
    sync(ctx)
    out = {"first_step_s": max_over_ranks(ctx, time.perf_counter() - t0)}
    if trainer.after_first_step is not None:
        out.update(trainer.after_first_step())
    if ctx.cuda:
        out["setup_peak_mem_gib"] = max_over_ranks(ctx, torch.cuda.max_memory_allocated(ctx.device) / 2**30)
    for _ in range(warmup - 1):
        trainer.step()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    sync(ctx)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    elapsed = time.perf_counter() - t0
    out["elapsed_s"] = max_over_ranks(ctx, elapsed)
    if ctx.cuda:
        out["peak_mem_gib"] = max_over_ranks(ctx, torch.cuda.max_memory_allocated(ctx.device) / 2**30)
    return out


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    dist.barrier(group=ctx.control)


def make_trainer(ctx: Context, contender: str, size: ModelSize, batch: Batch) -> Trainer:
    limit = {"mem_limit_gb": ctx.args.rannc_mem_limit_gb} if ctx.args.rannc_mem_limit_gb else {}
    if contender == "rannc":
        return rannc_trainer(ctx, size, batch)
    if contender == "rannc-2stage":
        return rannc_trainer(ctx, size, batch, partition_num=2, **limit)
    if contender == "rannc-memlimit":
        return rannc_trainer(ctx, size, batch, **limit)
    return {"ddp": ddp_trainer, "fsdp2": fsdp2_trainer, "1f1b": pipeline_trainer}[contender](ctx, size, batch)


def run_contender(ctx: Context, model_name: str, contender: str, batch: Batch,
                  build: Callable[[], Trainer]) -> dict:
    """One row: measured numbers, or the reason it did not run. All ranks agree on the outcome."""
    args = ctx.args
    global_batch = batch.global_ids.shape[0]
    label = LABELS[contender]
    if contender in ("rannc-2stage", "rannc-memlimit") and args.rannc_mem_limit_gb:
        label += f" ({args.rannc_mem_limit_gb:g} GB)"
    row: dict[str, Any] = {"model": model_name, "contender": label, "key": contender,
                           "global_batch": global_batch, "status": "ok"}
    free_memory(ctx)
    if ctx.rank == 0:
        print(f"== {model_name} / {label} (global batch {global_batch}) ...", flush=True)
    outcome: str | None = None
    trainer = None
    try:
        trainer = build()
        row["plan"] = trainer.plan
        row.update(measure(ctx, trainer, max(1, args.warmup), args.steps))
    except Skip as exc:
        outcome = f"skipped: {exc}"
    except Exception as exc:  # OOM or anything else: a row, not the end of the run
        outcome = f"error: {type(exc).__name__}: {_first_line(exc)}"
        print(f"[rank {ctx.rank}] {model_name} / {label} failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
    finally:
        trainer = None            # the model, its optimizer and its groups go before the next contender
    outcomes = [None] * ctx.world
    dist.all_gather_object(outcomes, outcome, group=ctx.control)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, reason = failed[0]
        row["status"] = reason.split(":", 1)[0]
        row["error"] = reason if len(failed) == ctx.world else f"{reason} (rank {rank})"
        free_memory(ctx)
        return row
    steps, elapsed = args.steps, row["elapsed_s"]
    row["step_ms"] = 1000 * elapsed / steps
    row["samples_per_s"] = global_batch * steps / elapsed
    flops = flops_per_sample(SIZES[model_name], ctx.nonembedding[model_name])
    row["tflops_per_gpu"] = row["samples_per_s"] * flops / ctx.world / 1e12
    if args.peak_tflops:
        row["mfu"] = row["tflops_per_gpu"] / args.peak_tflops
    free_memory(ctx)
    return row


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


# ---- report ---------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    """rannc rows: samples/s over the best baseline (DDP, FSDP2, 1F1B) of the same model."""
    for model in dict.fromkeys(r["model"] for r in rows):
        ran = [r for r in rows if r["model"] == model and r["key"] in BASELINES and r["status"] == "ok"]
        best = max(ran, key=lambda r: r["samples_per_s"], default=None)
        for r in rows:
            if r["model"] == model and r["key"].startswith("rannc") and r["status"] == "ok" and best:
                r["vs_best_other"] = r["samples_per_s"] / best["samples_per_s"]
                r["best_other"] = best["contender"]


def table(rows: list[dict]) -> str:
    def num(r, key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    lines = ["| model | contender | samples/s | step ms | MFU % | peak mem GiB | rannc / best other | plan |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['contender']} | {r['error']} | | | | | {r.get('plan', '')} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
        ratio = f"{r['vs_best_other']:.2f}x ({r['best_other']})" if r.get("vs_best_other") else (
            "-" if not r["key"].startswith("rannc") else "no other ran")
        lines.append(f"| {r['model']} | {r['contender']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | {mfu} | "
                     f"{num(r, 'peak_mem_gib', '{:.1f}')} | {ratio} | {r.get('plan', '')} |")
    return "\n".join(lines)


def write_json(ctx: Context, header: dict, rows: list[dict]) -> None:
    if ctx.rank == 0 and ctx.args.out:
        path = Path(ctx.args.out)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({**header, "results": rows}, indent=1))
        tmp.replace(path)


# ---- main -----------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="large,2.5b", help=f"comma-separated sizes among {', '.join(SIZES)}")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of {', '.join(CONTENDERS)} (rannc-memlimit runs only with "
                        "--rannc-mem-limit-gb)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least 1: rannc deploys in it)")
    p.add_argument("--batch-per-gpu", type=int, default=None,
                   help="local batch of every model (default per model: large 64, 2.5b 16, tiny 8)")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches of the 1F1B hand split")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device for MFU (default 989 on CUDA, H100/H200 bf16; none on CPU)")
    p.add_argument("--rannc-mem-limit-gb", type=float, default=None,
                   help="mem_limit_gb for 'rannc 2 stages', and adds 'rannc mem_limit' (the planner's own choice "
                        "under this limit)")
    p.add_argument("--two-stage-models", default="2.5b", help="models on which 'rannc 2 stages' runs")
    p.add_argument("--rannc-build-on", choices=("device", "cpu"), default="device",
                   help="where the model is built before RaNNCModule wraps it (cpu: the README's usage; "
                        "rannc moves each stage's parameters to its device)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 compute on CUDA (no bf16 autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=900.0,
                   help="collective timeout; a rank left waiting by a failure on another rank ends the run then")
    p.add_argument("--out", default=None, help="write the results as JSON here (rewritten after every row)")
    args = p.parse_args()
    for name in args.models.split(","):
        if name not in SIZES:
            p.error(f"unknown model '{name}'; choose among {', '.join(SIZES)}")
    for name in args.contenders.split(","):
        if name not in CONTENDERS:
            p.error(f"unknown contender '{name}'; choose among {', '.join(CONTENDERS)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    rank, world, device = init_distributed(args.timeout_s)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    ctx = Context(args, rank, world, device, None, None)
    make_groups(ctx)
    device_name = torch.cuda.get_device_name(device) if ctx.cuda else "cpu"
    header = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda, "world": world,
              "backend": dist.get_backend(), "autocast": "bf16" if ctx.cuda and not args.no_autocast else None,
              "peak_tflops": args.peak_tflops, "args": vars(args)}
    if rank == 0:
        print(f"device: {device_name} x {world} ({dist.get_backend()}), torch {torch.__version__}"
              f"{f', CUDA {torch.version.cuda}' if ctx.cuda else ''}, autocast {header['autocast'] or 'off'}, "
              f"rannc {rannc.__version__}", flush=True)
    wanted = args.contenders.split(",")
    two_stage_models = set(args.two_stage_models.split(","))
    rows: list[dict] = []
    for model_name in args.models.split(","):
        size = SIZES[model_name]
        with torch.device("meta"):
            probe = EncoderLM(size)
        n_params = sum(p.numel() for p in probe.parameters())
        ctx.nonembedding[model_name] = n_params - probe.embed.weight.numel()
        del probe
        batch_per_gpu = args.batch_per_gpu or size.batch_per_gpu
        batch = make_batch(ctx, size, batch_per_gpu)
        if rank == 0:
            print(f"\n### {model_name}: {_count(n_params)} parameters ({_count(ctx.nonembedding[model_name])} "
                  f"without the embedding), hidden {size.hidden}, {size.layers} layers, seq {size.seq}, "
                  f"{batch_per_gpu} per GPU, global batch {batch_per_gpu * world}", flush=True)
        for contender in CONTENDERS:
            if contender not in wanted:
                continue
            if contender == "rannc-2stage" and model_name not in two_stage_models:
                continue
            if contender == "rannc-memlimit" and not args.rannc_mem_limit_gb:
                continue
            build = functools.partial(make_trainer, ctx, contender, size, batch)
            row = run_contender(ctx, model_name, contender, batch, build)
            rows.append(row)
            if rank == 0:
                shown = (f"{row['samples_per_s']:.1f} samples/s, {row['step_ms']:.1f} ms/step"
                         if row["status"] == "ok" else row["error"])
                print(f"   {row['contender']}: {shown}", flush=True)
            add_ratios(rows)
            write_json(ctx, header, rows)
        del batch
    if rank == 0:
        print(f"\ndevice: {device_name} x {world}, torch {torch.__version__}, steps {args.steps} after "
              f"{max(1, args.warmup)} warm-up, MFU of {args.peak_tflops or '-'} TFLOP/s per device\n", flush=True)
        print(table(rows), flush=True)
    dist.barrier(group=ctx.control)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
