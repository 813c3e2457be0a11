"""BERT pretraining throughput, rannc vs DDP, on the same model, batch and optimizer in one launch.

    torchrun --nproc_per_node=2 benchmarks/bert_throughput.py --config_file bert/configs/bert_large.json \
        --batch_per_gpu 64 --steps 20

The model is bert/modeling.py's BertForPreTrainingWithCriterion (loss inside), seq 128 with 20 masked
positions per sequence (phase 1), LAMB, bf16 autocast on GPUs. Its MLM head scores the masked positions
only; --full_sequence_mlm runs the seed's head over every position. Prints the rannc plan, samples/s,
peak memory per GPU (allocated, and reserved: under CUDA graphs, which rannc replays on GPUs, only the reserved
figure holds the graphs' memory) and the ratio rannc / DDP, and after the timed steps a few steps timed phase by phase
(forward, backward, clipping, optimizer; each followed by a device sync) to compare with the plan's parts.
Clipping is bert/pretrain.py's: every contender takes the norm of its gradients (rannc's `calc_grad_norm`,
torch's `get_total_norm`) and LAMB divides by it inside its update; --clip_with_model clips apart first.

Contenders (`--contenders`, comma-separated): `rannc`; `rannc:ITEM=VALUE;...` forcing rannc config items
(`rannc:partition_num=2`, `rannc:compile=false`): the planner's choice measured against its alternatives in one
launch; `ddp` (DistributedDataParallel over the plain model); on one process also `eager` (the plain model),
`compiled` (torch.compile of the plain model) and `hf` (Hugging Face's BertForPreTraining of the same shape
with SDPA attention, its MLM head over every position, as it ships). MFU counts the model's FLOPs
(`flops_per_sample`) against --peak_tflops (989, H100/H200 bf16 dense, on CUDA).

One-GPU comparison of issue-level targets:

    torchrun --nproc_per_node=1 benchmarks/bert_throughput.py --batch_per_gpu 64 \
        --contenders eager,compiled,hf,rannc,rannc:compile=false
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


def flops_per_sample(config: BertConfig, seq: int, preds: int, full_sequence_mlm: bool) -> float:
    """Training FLOPs of one sequence (3 x the forward's multiply-adds x 2): the encoder's matmuls over every
    position, attention's two S x S products, the pooler, and the MLM transform and decoder over the scored
    positions (`preds`, or all with the full head)."""
    h, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    encoder = layers * seq * (4 * h * h + 2 * h * ff + 2 * seq * h)
    scored = seq if full_sequence_mlm else preds
    head = scored * (h * h + h * config.padded_vocab_size) + h * h + 2 * h
    return 6.0 * (encoder + head)


def hf_model(config: BertConfig):
    """Hugging Face's BertForPreTraining of the same shape (SDPA attention, dropout as configured)."""
    import transformers

    hf_config = transformers.BertConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob, attn_implementation="sdpa")
    return transformers.BertForPreTraining(hf_config)


class HFLoss(torch.nn.Module):
    """Hugging Face's model called with this benchmark's masked-positions batch: labels scattered to every
    position (-100 elsewhere), the loss it computes itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, segments, mask, positions, masked_ids, next_sentence):
        labels = torch.full_like(ids, -100).scatter_(1, positions, masked_ids)
        return self.model(input_ids=ids, token_type_ids=segments, attention_mask=mask, labels=labels,
                          next_sentence_label=next_sentence).loss


class GcTime:
    """Seconds the Python garbage collector ran (all generations), from gc's callbacks: a collection that walks
    the large object graphs of captured and compiled models pauses the host for milliseconds."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, None
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        gc.callbacks.remove(self)


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
    clipping = {}
    if optimizer.max_grad_norm:   # clipping inside LAMB's update, by the norm taken here (bert/pretrain.py's way)
        clipping["grad_norm"] = (wrapped.calc_grad_norm() if kind == "rannc" else torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]))
    elif kind == "rannc":
        wrapped.clip_grad_norm(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sync()
    marks.append(time.perf_counter())
    optimizer.step(**clipping)
    optimizer.zero_grad(set_to_none=True)
    sync()
    marks.append(time.perf_counter())
    return loss, [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


def kernel_time(parts: tuple, steps: int, top: int = 12) -> dict:
    """The device's own time over `steps` steps under torch.profiler (CUDA only): the union of the kernels' intervals
    per step (the step minus it is time the device waited for the host), how many kernels a step launches, the
    kernels that take most of it, and the pairs of kernels between which it waited longest. Tells a step bound by
    the device from one bound by the host, and where the host holds it up."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(*parts, lambda: None)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith("Optimizer.")]   # the optimizer's own annotation spans its kernels
    busy_us, reach = 0.0, float("-inf")   # each kernel adds what it runs beyond those started before it
    waits: dict[tuple[str, str], list[float]] = {}   # the device idle between two kernels: after which, before which
    last = ""
    for start, end, name in sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in kernels):
        if last and start - reach > 0:
            entry = waits.setdefault((last, name), [0, 0.0])
            entry[0] += 1
            entry[1] += start - reach
        busy_us += max(0.0, end - max(start, reach))
        if end > reach:
            reach, last = end, name
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us()
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    longest_waits = sorted(waits.items(), key=lambda kv: -kv[1][1])[:top]
    return {"device_busy_ms": round(busy_us / steps / 1e3, 2), "kernels_per_step": len(kernels) / steps,
            "top_kernels_ms": {name: [round(us / steps / 1e3, 3), count / steps] for name, (count, us) in ranked},
            "top_waits_ms": {f"{a} -> {b}": [round(us / steps / 1e3, 3), count / steps]
                             for (a, b), (count, us) in longest_waits}}


def _timed_steps(args, parts: tuple, device, gc_time: GcTime) -> tuple[float, torch.Tensor, float]:
    """--warmup steps, then --steps timed ones queued back to back: (their seconds, the last loss, the first
    step's seconds)."""
    setup_s = None
    t_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
            dist.barrier()
            gc_time.seconds = 0.0
            t0 = time.perf_counter()
        loss, _ = train_step(*parts, lambda: None)
        if step == 0:
            setup_s = time.perf_counter() - t_start
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0, loss, setup_s


def run(kind: str, args, config, device, rank, world) -> dict:
    name, items = kind, contender_items(kind)
    kind = kind.split(":")[0]
    torch.manual_seed(args.seed)
    if kind in ("eager", "compiled", "hf") and world > 1:
        raise ValueError(f"contender {kind} runs on one process only (use ddp or rannc on several)")
    if kind == "hf":
        if args.full_sequence_mlm:
            raise ValueError("contender hf takes the masked-positions batch")
        model = HFLoss(hf_model(config))
    else:
        model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=args.full_sequence_mlm)
    if kind != "rannc":
        model = model.to(device)
    optimizer = Lamb(bert_param_groups(model), lr=1e-4, max_grad_norm=0 if args.clip_with_model else 1.0)
    if kind == "rannc":
        # every step ends with zero_grad(set_to_none=True) and nothing accumulates: tell the planner
        # clipping inside LAMB's update is part of the optimizer step that rannc times: nothing apart to price
        items = {**({"partition_num": args.partition_num} if args.partition_num else {}),
                 "plan_grad_clipping": args.clip_with_model, **items}
        wrapped = rannc.RaNNCModule(model, optimizer, accumulate_grads=False, **items)
    elif kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                            if device.type == "cuda" else None)
    elif kind == "compiled":
        wrapped = torch.compile(model)
    elif kind in ("eager", "hf"):
        wrapped = model
    else:
        raise ValueError(f"unknown contender {kind!r}: rannc[:ITEM=VALUE;...], ddp, eager, compiled or hf")
    batch = make_batch(config, args.batch_per_gpu, args.seq, args.preds, device, args.seed + rank,
                       args.full_sequence_mlm)
    use_autocast = device.type == "cuda" and not args.no_autocast
    parts = (kind, wrapped, model, optimizer, batch, use_autocast, device)
    gc_time = GcTime()
    try:
        elapsed, loss, setup_s = _timed_steps(args, parts, device, gc_time)
    finally:
        gc_time.close()
    gc_ms = gc_time.seconds * 1e3 / args.steps
    phases = [train_step(*parts, functools.partial(sync_device, device))[1] for _ in range(args.breakdown_steps)]
    breakdown = {name: round(statistics.median(p[i] for p in phases), 2)
                 for i, name in enumerate(("forward", "backward", "clip", "optimizer"))} if phases else {}
    kernels = kernel_time(parts, args.kernel_steps) if args.kernel_steps and device.type == "cuda" else {}
    # allocated misses what CUDA graphs' replays use: their memory was allocated while they recorded, before the
    # peak was reset, and a replay allocates nothing; reserved holds the graphs' pools (and free cached blocks)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
    peaks, reserved_peaks = [None] * world, [None] * world
    dist.all_gather_object(peaks, round(peak, 2))
    dist.all_gather_object(reserved_peaks, round(reserved, 2))
    loss_value = loss.detach().clone()
    if kind == "ddp":
        dist.all_reduce(loss_value)
        loss_value /= world
    loss_value = loss_value.item()
    samples_per_s = args.steps * args.batch_per_gpu * world / elapsed
    flops = flops_per_sample(config, args.seq, args.preds, args.full_sequence_mlm)
    result = {"contender": name, "samples_per_s": samples_per_s,
              "mfu": samples_per_s * flops / world / (args.peak_tflops * 1e12) if args.peak_tflops else None,
              "step_ms": elapsed / args.steps * 1e3, "peak_mem_gib_per_gpu": peaks,
              "peak_reserved_gib_per_gpu": reserved_peaks, "first_step_s": setup_s,
              "final_loss": loss_value, "breakdown_ms": breakdown, "gc_ms_per_step": round(gc_ms, 2), **kernels}
    if kind == "rannc":
        deployment = wrapped.deployment
        result["plan"] = deployment.table()
        result["predicted_step_ms"] = deployment.predicted_step_ms
        result["predicted_over_measured_step"] = deployment.predicted_step_ms / result["step_ms"]
        result["predicted_peak_gib"] = deployment.peak_memory_bytes() / 2**30
        if peak:
            result["predicted_over_measured_peak"] = result["predicted_peak_gib"] / max(p for p in peaks if p)
            result["predicted_over_reserved_peak"] = result["predicted_peak_gib"] / max(
                p for p in reserved_peaks if p)
    del wrapped, model, optimizer, batch, loss, parts
    gc.unfreeze()
    forget_contender(device)
    return result


def forget_contender(device: torch.device) -> None:
    """Free what a contender left behind before the next one runs: compiled code and CUDA graphs (with their
    memory pools) held by torch.compile's caches, and cached blocks. Kept, they grew the peak memory measured from
    contender to contender within one launch (BERT-large: 11.9 GiB for the first, 15.7 for a later one)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch_per_gpu", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--preds", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--breakdown_steps", type=int, default=3, help="steps timed phase by phase after the timed ones")
    p.add_argument("--kernel_steps", type=int, default=0,
                   help="on CUDA, steps run under torch.profiler after the others: the device's busy time per step "
                        "and the kernels that take it (kernel_time)")
    p.add_argument("--contenders", default="rannc,ddp")
    p.add_argument("--partition_num", type=int, default=0)
    p.add_argument("--no_autocast", action="store_true")
    p.add_argument("--clip_with_model", action="store_true",
                   help="clip apart before a LAMB step without clipping (rannc's clip_grad_norm, torch's "
                        "clip_grad_norm_); default: LAMB divides by the norm inside its update, as bert/pretrain.py")
    p.add_argument("--full_sequence_mlm", action="store_true", help="the seed's MLM head over every position")
    p.add_argument("--no_dropout", action="store_true",
                   help="both dropout probabilities 0: losses that depend on the weights alone, not on the masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gc_freeze", action="store_true",
                   help="move every object alive after the warm-up steps out of the garbage collector's reach "
                        "(gc.freeze), to see what its pauses cost")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device for MFU (default 989 on CUDA, H100/H200 bf16; none on CPU)")
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
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    config = BertConfig.from_json_file(args.config_file)
    if args.no_dropout:
        config = config.without_dropout()
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
            forget_contender(device)
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
            if "plan" in row:
                print(row["plan"], flush=True)
    if rank == 0:
        ok = {r["contender"]: r for r in rows if "error" not in r}
        print("| contender | samples/s | step ms | MFU % | peak GiB per GPU (allocated; reserved) | "
              "forward / backward / clip / optimizer ms |\n| --- | ---: | ---: | ---: | --- | --- |")
        for r in rows:
            if "error" in r:
                print(f"| {r['contender']} | {r['error']} | | | | |")
            else:
                mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") else "-"
                parts = " / ".join(f"{v:.1f}" for v in r["breakdown_ms"].values())
                print(f"| {r['contender']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | {mfu} | "
                      f"{r['peak_mem_gib_per_gpu']}; {r['peak_reserved_gib_per_gpu']} | {parts} |")
        if "rannc" in ok and "ddp" in ok:
            print(f"rannc / DDP = {ok['rannc']['samples_per_s'] / ok['ddp']['samples_per_s']:.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "device": name, "world": world, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
