"""Is a loss gap between fp32 weights and bf16 weights with fp32 masters precision, or dropout's noise?

The plain BERT model (no rannc) trains a few steps on one fixed batch, as benchmarks/bert_throughput.py's
contenders do, in regimes named by parts joined with ``_``:

- ``fp32``: fp32 parameters under bf16 autocast, LAMB over them;
- ``bf16``: bf16 parameters under the same autocast, LAMB over fp32 masters, stepping the bf16 compute copies
  in its own passes (``Lamb.compute_copies``: what rannc's ``param_dtype="bfloat16"`` hands it);
- ``foreach``: LAMB's foreach path instead of its fused kernels; ``norms32``: LayerNorm weights kept in fp32
  (the bf16 copy of a weight of 1.0 moves only once its master has moved by 2^-8);
- ``nodrop``: both dropout probabilities 0 (no masks, so no mask stream that the weights' dtype could shift);
- ``seedN``: dropout masks from seed N (the noise of the masks alone); ``cpuinit``: the model initialised on
  the CPU and moved, as bert_throughput.py builds it (the same initial weights as its rannc rows).

    python benchmarks/bf16_weights_loss.py --config_file bert/configs/bert_4.9b.json \\
        --regimes fp32,bf16,bf16_foreach,bf16_norms32,fp32_nodrop,bf16_nodrop,fp32_seed1,fp32_seed2

One JSON line per regime: the loss at every step, the last steps' phases between device syncs (forward,
backward, clipping, optimizer ms), the peak memory and, for bf16, the largest difference between a compute
copy and its master rounded to bf16 (0 when the copies are what the masters say).
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

from benchmarks.bert_throughput import make_batch  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402
from bert.optim import Lamb, bert_param_groups  # noqa: E402


def build(regime: set[str], config: BertConfig, device: torch.device, lr: float):
    """The model and its optimizer in this regime; with bf16 the optimizer holds fp32 masters."""
    torch.manual_seed(0)
    if "cpuinit" in regime:
        model = BertForPreTrainingWithCriterion(config).to(device)
    else:
        with device:
            model = BertForPreTrainingWithCriterion(config)
    groups = bert_param_groups(model)
    copies: dict[torch.Tensor, torch.Tensor] = {}
    if "bf16" in regime:
        kept = ({id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
                if "norms32" in regime else set())
        master_of = {}
        for p in model.parameters():
            if id(p) not in kept:
                master_of[p] = p.detach().clone()
                p.data = p.data.to(torch.bfloat16)
        groups = [{**g, "params": [master_of.get(p, p) for p in g["params"]]} for g in groups]
        copies = {m: p for p, m in master_of.items()}
    optimizer = Lamb(groups, lr=lr, max_grad_norm=0, fused=False if "foreach" in regime else None)
    optimizer.compute_copies = copies
    return model, optimizer, copies


def train_step(model, optimizer, batch, device, sync) -> tuple[float, list[float]]:
    marks = [time.perf_counter()]

    def mark():
        sync()
        marks.append(time.perf_counter())

    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(*batch)
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    mark()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    mark()
    return loss.item(), [round(1e3 * (b - a), 1) for a, b in zip(marks, marks[1:])]


def run(name: str, args, device: torch.device) -> dict:
    regime = set(name.split("_"))
    config = BertConfig.from_json_file(args.config_file)
    if "nodrop" in regime:
        config = config.without_dropout()
    model, optimizer, copies = build(regime, config, device, args.lr)
    seeds = [int(part[4:]) for part in regime if part.startswith("seed")]
    if seeds:
        torch.manual_seed(seeds[0])
    batch = make_batch(config, args.batch, 128, 20, device, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses, phases = [], []
    for step in range(args.steps + args.phase_steps):
        loss, times = train_step(model, optimizer, batch, device, sync if step >= args.steps else lambda: None)
        (losses if step < args.steps else phases).append(loss if step < args.steps else times)
    with torch.no_grad():
        worst = max((float((c.float() - m.to(c.dtype).float()).abs().max()) for m, c in copies.items()), default=None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"regime": name, "losses": [round(x, 4) for x in losses], "phases_fwd_bwd_clip_opt_ms": phases,
            "copy_vs_rounded_master_max_diff": worst, "peak_gib": peak and round(peak, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_tiny.json")
    p.add_argument("--regimes", default="fp32,bf16,fp32_nodrop,bf16_nodrop,fp32_seed1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=14, help="steps whose losses are printed (bert_throughput.py's "
                   "rannc rows report the loss of step 11: 3 warm-up and 8 timed)")
    p.add_argument("--phase_steps", type=int, default=3, help="steps timed phase by phase after them")
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    for name in args.regimes.split(","):
        print(json.dumps(run(name, args, device)), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
