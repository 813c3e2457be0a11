"""The zero-bubble schedules' split backward against a plain backward, on a stack of BERT layers (one stage):

    python benchmarks/split_backward_speed.py --layers 12 --rows 8          # GPU if there is one

Times, per micro-batch, the forward, the plain backward (B), and the split one: BI (the inputs' gradients)
and BW (the weights'), each followed by a device sync, median of --repeats: the planner prices BI and BW as
shares of B (rannc/plan/planner.py SPLIT_BACKWARD).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bert.modeling import BertConfig, BertLayer  # noqa: E402
from rannc.profile.profiler import sync_device  # noqa: E402
from rannc.split_backward import backward_input  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config = BertConfig.from_json_file(args.config_file)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    stack = torch.nn.Sequential(*[BertLayer(config, k + 1) for k in range(args.layers)]).to(device)
    params = list(stack.parameters())
    x0 = torch.randn(args.rows, args.seq, config.hidden_size, device=device)
    mask = torch.zeros(args.rows, 1, 1, args.seq, device=device)
    use_autocast = device.type == "cuda"

    def forward():
        x = x0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            y = x
            for layer in stack:
                y = layer(y, mask)
        return x, y

    def timed(fn, *fn_args):
        sync_device(device)
        t0 = time.perf_counter()
        out = fn(*fn_args)
        sync_device(device)
        return out, (time.perf_counter() - t0) * 1e3

    rows = {"forward": [], "B": [], "BI": [], "BW": []}
    for _ in range(args.repeats + 2):
        (x, y), t = timed(forward)
        rows["forward"].append(t)
        g = torch.ones_like(y)
        _, t = timed(torch.autograd.backward, [y], [g])
        rows["B"].append(t)
        x, y = forward()
        (_, weights), t = timed(backward_input, [y], [g], [x], params)
        rows["BI"].append(t)
        _, t = timed(weights.run)
        rows["BW"].append(t)
        for q in params:
            q.grad = None
    medians = {k: statistics.median(v[2:]) for k, v in rows.items()}
    print(f"{device} {args.layers} BERT layers, {args.rows} rows x {args.seq}: " +
          ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items()) +
          f"; (BI + BW) / B = {(medians['BI'] + medians['BW']) / medians['B']:.2f}")


if __name__ == "__main__":
    main()
