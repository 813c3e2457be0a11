"""Do bf16 gradients help? The step of the plain BERT model in two regimes, phase by phase, on one device:

- ``fp32``: fp32 parameters under bf16 autocast (what rannc and the BERT application run): the forward casts
  each weight to bf16, the backward accumulates fp32 gradients; clipping and LAMB read fp32 gradients.
- ``bf16``: bf16 parameters (the compute copy) under the same autocast, fp32 master weights and LAMB states
  kept: the backward writes bf16 gradients (half the bytes), clipping reads them; before LAMB they are cast
  into fp32 buffers (``grad cast``), and after it the masters are rounded into the bf16 parameters
  (``copy back``). A fused kernel could fold both into LAMB's passes; the table lists them apart so that
  what fusion would save can be read off.

    torchrun --nproc_per_node=1 benchmarks/bf16_grads.py --config_file bert/configs/bert_large.json --batch 64
    python benchmarks/bf16_grads.py --curve_steps 300        # the training curves, tiny model, CPU is fine

Each phase is timed between device syncs (median of --repeats steps); one JSON line per regime. With
``--curve_steps`` the tiny model trains that many steps of a copy task (name the token shown at each scored
position) in each regime and twice more in fp32 with other
dropout seeds; the bf16 curve's distance from the fp32 one is printed beside the fp32 seeds' distance from
each other (the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bert_throughput import make_batch  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from bert.optim import Lamb, bert_param_groups  # noqa: E402

PHASES = ("forward", "backward", "clip", "grad cast", "optimizer", "copy back")


class Regime:
    """One way of keeping weights and gradients: `step()` runs a training step phase by phase, each phase
    followed by `sync`, and returns the loss and the phases' milliseconds."""

    def __init__(self, kind: str, config: BertConfig, device: torch.device, lr: float, dropout_seed: int = 0):
        torch.manual_seed(0)
        self.kind, self.device = kind, device
        with device:   # initialised where it runs: the 4.9B model's initialisation on the CPU takes minutes
            self.model = BertForPreTrainingWithCriterion(config)
        torch.manual_seed(dropout_seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if kind == "fp32":
            self.masters = self.params
            self.optimizer = Lamb(bert_param_groups(self.model), lr=lr, max_grad_norm=0)
            return
        self.model.to(torch.bfloat16)
        self.masters = [p.detach().float().requires_grad_() for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        master_of = dict(zip(self.params, self.masters))
        groups = [{**g, "params": [master_of[p] for p in g["params"]]} for g in bert_param_groups(self.model)]
        self.optimizer = Lamb(groups, lr=lr, max_grad_norm=0)

    def step(self, batch, sync) -> tuple[torch.Tensor, list[float]]:
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(*batch)
        mark()
        loss.backward()
        mark()
        grads = [p.grad for p in self.params]
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        mark()
        if self.kind == "bf16":
            torch._foreach_copy_([m.grad for m in self.masters], grads)
        mark()
        self.optimizer.step()
        mark()
        if self.kind == "bf16":
            torch._foreach_copy_([p.data for p in self.params], [m.detach() for m in self.masters])
            for p in self.params:
                p.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=True)
        mark()
        return loss.detach(), [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


def speed(args, device: torch.device) -> None:
    config = BertConfig.from_json_file(args.config_file)
    batch = make_batch(config, args.batch, 128, 20, device, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for kind in ("fp32", "bf16"):
        regime = Regime(kind, config, device, lr=1e-4)
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats + 2):
            times.append(regime.step(batch, sync)[1])
        phases = {name: round(statistics.median(t[i] for t in times[2:]), 2) for i, name in enumerate(PHASES)}
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        print(json.dumps({"regime": kind, "config": os.path.basename(args.config_file), "batch": args.batch,
                          "step_ms": round(sum(phases.values()), 2), "phases_ms": phases,
                          "peak_gib": peak and round(peak, 2)}), flush=True)
        del regime
        if device.type == "cuda":
            torch.cuda.empty_cache()


def curves(args, device: torch.device) -> None:
    """Losses of the tiny model over `curve_steps` steps: bf16 and fp32 gradients on the same data and dropout
    seed, and fp32 with two other dropout seeds to measure the noise."""
    config = BertConfig.from_json_file("bert/configs/bert_tiny.json")
    runs = {"fp32": ("fp32", 0), "bf16": ("bf16", 0), "fp32 seed 1": ("fp32", 1), "fp32 seed 2": ("fp32", 2)}
    losses: dict[str, list[float]] = {}

    def copy_task(step: int) -> list[torch.Tensor]:
        """Random tokens whose scored positions are to be predicted as the token the input shows there: a
        task the model learns within a few hundred steps, so that the curves fall."""
        batch = make_batch(config, args.curve_batch, 128, 20, device, 1000 + step)
        batch[4] = batch[0].gather(1, batch[3])
        return batch

    for name, (kind, seed) in runs.items():
        regime = Regime(kind, config, device, lr=args.curve_lr, dropout_seed=seed)
        losses[name] = [regime.step(copy_task(s), lambda: None)[0].item() for s in range(args.curve_steps)]

    def distance(a: str, b: str, window: int) -> float:
        """Mean absolute difference of two curves' moving averages over `window` steps."""
        def smooth(xs):
            return [statistics.fmean(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]
        return statistics.fmean(abs(x - y) for x, y in zip(smooth(losses[a]), smooth(losses[b])))

    window = max(1, args.curve_steps // 20)
    tail = max(1, args.curve_steps // 10)
    print(json.dumps({
        "steps": args.curve_steps, "smoothing_window": window,
        "first_last_loss": {k: [round(v[0], 4), round(statistics.fmean(v[-tail:]), 4)] for k, v in losses.items()},
        "bf16_vs_fp32": round(distance("bf16", "fp32", window), 4),
        "noise_fp32_seed1_vs_fp32": round(distance("fp32 seed 1", "fp32", window), 4),
        "noise_fp32_seed2_vs_fp32": round(distance("fp32 seed 2", "fp32", window), 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--curve_steps", type=int, default=0, help="train the tiny model this many steps per regime")
    p.add_argument("--curve_batch", type=int, default=16)
    p.add_argument("--curve_lr", type=float, default=5e-3)
    args = p.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.curve_steps:
        curves(args, device)
    else:
        speed(args, device)


if __name__ == "__main__":
    main()
