"""What inductor's own kernels cost in BERT's compiled forward and backward, on one CUDA device.

Two measurements of `torch.compile` of the plain model (bert/modeling.py, bf16 autocast, dropout on, the
masked-positions head; forward and backward only, the optimizer left out):

- `--options`: the step under several sets of inductor options, each compiled for a model of its own (same
  weights), timed in alternating rounds in one process, so that a ratio between them holds on any host. An
  option set is `name=value` pairs joined by `;`, `default` for none, e.g.
  `default,coordinate_descent_tuning=true,fallback_random=true`.
- `--bandwidth`: one step with inductor's per-kernel profile (its `profile_bandwidth` option), which times
  every Triton kernel it generated on its first call and counts the bytes of its arguments; printed per kernel,
  summed over its calls, with the achieved TB/s. cuBLAS and cuDNN kernels are not in it.

    python benchmarks/inductor_kernels.py --batch 256 --options "default,coordinate_descent_tuning=true"
    python benchmarks/inductor_kernels.py --batch 256 --bandwidth --out bandwidth.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bert_throughput import make_batch  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from rannc.config import inductor_options  # noqa: E402


def parse_options(spec: str) -> dict:
    """`coordinate_descent_tuning=true;combo_kernels=true` -> inductor options, read as rannc's compile_options
    item reads them; `default` -> {}."""
    return dict(inductor_options(" ".join(p for p in spec.split(";") if p != "default")))


def forward_backward(compiled, model, batch) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(*batch)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def compiled_model(config: BertConfig, options: dict, device: torch.device):
    torch.manual_seed(0)
    model = BertForPreTrainingWithCriterion(config).to(device)
    return torch.compile(model, options=options or None), model


def compare_options(args, config, batch, device) -> dict:
    """Alternating rounds of `args.steps` steps per option set, after two steps each (the compile)."""
    runs = {}
    for spec in args.options.split(","):
        compiled, model = compiled_model(config, parse_options(spec), device)
        start = time.perf_counter()
        for _ in range(2):
            forward_backward(compiled, model, batch)
        torch.cuda.synchronize()
        print(f"{spec}: compile and two steps {time.perf_counter() - start:.1f} s", flush=True)
        runs[spec] = (compiled, model)
    times = {spec: [] for spec in runs}
    for _ in range(args.rounds):
        for spec, (compiled, model) in runs.items():
            forward_backward(compiled, model, batch)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(args.steps):
                forward_backward(compiled, model, batch)
            end.record()
            torch.cuda.synchronize()
            times[spec].append(begin.elapsed_time(end) / args.steps)
    first = min(next(iter(times.values())))
    rows = {spec: {"best_ms": min(t), "rounds_ms": [round(x, 2) for x in t], "best_over_first": min(t) / first}
            for spec, t in times.items()}
    for spec, row in rows.items():
        print(f"| {spec} | {row['best_ms']:.2f} | {row['best_over_first']:.4f} | {row['rounds_ms']} |", flush=True)
    return rows


def kernel_bandwidth(config, batch, device) -> list[dict]:
    """Per graph (forward, backward), each Triton kernel's calls, milliseconds and gigabytes, largest first."""
    from torch._inductor.runtime import triton_heuristics

    graphs = []

    def end_graph(output_file):   # the generated code calls it after each graph with the calls it timed
        graphs.append(list(triton_heuristics.collected_calls))

    triton_heuristics.end_graph = end_graph
    compiled, model = compiled_model(config, {"profile_bandwidth": True}, device)
    forward_backward(compiled, model, batch)
    torch.cuda.synchronize()
    tables = []
    for index, calls in enumerate(graphs):
        kernels = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for ms, gb, _, name in calls:
            entry = kernels[name]
            entry[0] += 1
            entry[1] += ms
            entry[2] += gb
        total_ms, total_gb = sum(c[0] for c in calls), sum(c[1] for c in calls)
        print(f"graph {index}: {len(calls)} kernel calls, {total_ms:.2f} ms, {total_gb:.2f} GB, "
              f"{total_gb / total_ms:.2f} TB/s", flush=True)
        rows = sorted(({"kernel": name, "calls": n, "ms": ms, "gb": gb} for name, (n, ms, gb) in kernels.items()),
                      key=lambda r: -r["ms"])
        for r in rows[:15]:
            print(f"  {r['ms']:7.2f} ms {r['calls']:4d}x {r['gb']:7.2f} GB {r['gb'] / r['ms']:5.2f} TB/s "
                  f"{r['kernel'][:100]}", flush=True)
        tables.append({"graph": index, "ms": total_ms, "gb": total_gb, "kernels": rows})
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--preds", type=int, default=20)
    p.add_argument("--options", default="default,coordinate_descent_tuning=true",
                   help="option sets to compare, comma-separated (see the module's text)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--bandwidth", action="store_true", help="the per-kernel table instead of the comparison")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("inductor_kernels.py measures CUDA kernels: no CUDA device here")
    device = torch.device("cuda")
    config = BertConfig.from_json_file(args.config_file)
    batch = make_batch(config, args.batch, args.seq, args.preds, device, seed=0)
    print(f"{args.config_file}, batch {args.batch}, seq {args.seq}; {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}", flush=True)
    result = kernel_bandwidth(config, batch, device) if args.bandwidth else compare_options(args, config, batch,
                                                                                             device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
