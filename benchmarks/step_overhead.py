"""Where rannc's training step spends time beyond the plain model's, at world size 1 on one device (issue: rannc
at world size 1 should cost no more than the plain model).

    torchrun --nproc_per_node=1 benchmarks/step_overhead.py --config_file bert/configs/bert_large.json --batch 64

Prints one JSON object, then tables. The JSON: the plain model's and rannc's whole training step (forward,
backward, clipping, LAMB) queued back to back as a training loop runs them (`*_step_ms`, and their ratio); the
host's time to issue each phase without waiting for the device (`*_host_ms`: a host-bound step is as slow as
their sum); the places where a step makes the host wait for the device (CUDA's sync debug mode); and phases
timed between device syncs (forward, forward + backward, rannc's stage module called directly; medians of
--repeats). The tables: torch.profiler's ops of one step of each by the host's own time, and a cProfile of
rannc's steps (Python functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rannc  # noqa: E402
from benchmarks.bert_throughput import make_batch  # noqa: E402
from benchmarks.clip_speed import median_ms  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from bert.optim import Lamb, bert_param_groups  # noqa: E402


def one_device_bert(description: str):
    """What a one-process BERT benchmark starts from: its arguments (--config_file, --batch, --repeats), the
    device, the process group, the BERT config, a batch of it (seq 128, 20 masked positions) and the autocast
    context (bf16 on GPUs)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rows", type=int, default=25, help="rows of the op and function tables")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:   # intra-op threads spinning on a shared 2-core machine slow every op 10x and more
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    config = BertConfig.from_json_file(args.config_file)
    batch = make_batch(config, args.batch, 128, 20, device, 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    return args, device, config, batch, autocast


def deployed(model, batch, autocast):
    """The model wrapped by rannc (LAMB, nothing accumulated) after its first call, which deploys it, and
    its optimizer."""
    optimizer = Lamb(bert_param_groups(model), lr=1e-4, max_grad_norm=0)
    wrapped = rannc.RaNNCModule(model, optimizer, accumulate_grads=False)
    with autocast:
        wrapped(*batch).backward()
    return wrapped, optimizer


def whole_steps_ms(step, device: torch.device, steps: int) -> float:
    """Milliseconds per training step over `steps` steps queued back to back (one device sync at the end):
    what a training loop sees, host and device overlapping."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def host_phases_ms(phases, device: torch.device, repeats: int) -> dict[str, float]:
    """The host's milliseconds to issue each phase of a step (no sync inside the step, one after it): where a
    host-bound step spends its time. Medians over `repeats` steps."""
    times: dict[str, list[float]] = {name: [] for name, _ in phases}
    for _ in range(repeats + 2):
        for name, fn in phases:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def host_syncs(step, device: torch.device) -> list[str]:
    """Where one step makes the host wait for the device (CUDA's sync debug mode), innermost frames first."""
    if device.type != "cuda":
        return []
    found: list[str] = []

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-8:-1]]
        found.append(f"{message} at " + " <- ".join(reversed(frames)))

    shown, warnings.showwarning = warnings.showwarning, note
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    return found


def op_table(step, device: torch.device, rows: int) -> str:
    """torch.profiler's table of one step's ops by the host's own time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    args, device, config, batch, autocast = one_device_bert(__doc__)
    torch.manual_seed(0)
    model = BertForPreTrainingWithCriterion(config).to(device)
    plain_optimizer = Lamb(bert_param_groups(model), lr=1e-4, max_grad_norm=0)

    def eager_forward():
        with autocast:
            return model(*batch)

    def eager_step():
        eager_forward().backward()
        model.zero_grad(set_to_none=True)

    def eager_train_step():
        eager_forward().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    result = {"eager_forward_ms": median_ms(eager_forward, device, args.repeats),
              "eager_forward_backward_ms": median_ms(eager_step, device, args.repeats)}
    eager_whole = whole_steps_ms(eager_train_step, device, args.repeats)
    eager_loss: list = []
    eager_host = host_phases_ms([("forward", lambda: eager_loss.append(eager_forward())),
                                 ("backward", lambda: eager_loss.pop().backward()),
                                 ("clip", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)),
                                 ("optimizer", lambda: (plain_optimizer.step(),
                                                        plain_optimizer.zero_grad(set_to_none=True)))],
                                device, args.repeats)
    eager_ops = op_table(eager_train_step, device, args.rows)
    wrapped, optimizer = deployed(model, batch, autocast)
    stage = wrapped._engine.runtime.stage

    def stage_forward():
        args_of_stage = [batch[i] for i in stage.inputs]
        with autocast:
            return stage.module(*args_of_stage)

    def rannc_forward():
        with autocast:
            return wrapped(*batch)

    def rannc_step():
        rannc_forward().backward()
        wrapped.zero_grad(set_to_none=True)

    def rannc_train_step():
        rannc_forward().backward()
        wrapped.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result.update(stage_module_forward_ms=median_ms(stage_forward, device, args.repeats),
                  rannc_forward_ms=median_ms(rannc_forward, device, args.repeats),
                  rannc_forward_backward_ms=median_ms(rannc_step, device, args.repeats))
    rannc_whole = whole_steps_ms(rannc_train_step, device, args.repeats)
    rannc_loss: list = []
    rannc_host = host_phases_ms([("forward", lambda: rannc_loss.append(rannc_forward())),
                                 ("backward", lambda: rannc_loss.pop().backward()),
                                 ("clip", lambda: wrapped.clip_grad_norm(1.0)),
                                 ("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))],
                                device, args.repeats)
    result.update(eager_step_ms=eager_whole, rannc_step_ms=rannc_whole,
                  rannc_over_eager_speed=eager_whole / rannc_whole)
    result = {k: round(v, 3) for k, v in result.items()}
    result.update(eager_host_ms={k: round(v, 2) for k, v in eager_host.items()},
                  rannc_host_ms={k: round(v, 2) for k, v in rannc_host.items()},
                  eager_syncs=host_syncs(eager_train_step, device), rannc_syncs=host_syncs(rannc_train_step, device))
    print(json.dumps(result, indent=1), flush=True)
    print("plain model, one training step, ops by host time:\n" + eager_ops)
    print("rannc, one training step, ops by host time:\n" + op_table(rannc_train_step, device, args.rows))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        rannc_train_step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
