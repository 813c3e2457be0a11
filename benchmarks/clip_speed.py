"""Global gradient clipping: rannc's `clip_grad_norm` against `torch.nn.utils.clip_grad_norm_` on the same
gradients, one process (the ratio is the figure; on a GPU the absolute times too).

    torchrun --nproc_per_node=1 benchmarks/clip_speed.py --config_file bert/configs/bert_large.json

The model is bert/modeling.py's BertForPreTrainingWithCriterion; one training call creates the gradients,
then each clipping is timed `--repeats` times (median, device synchronised).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bert_throughput import make_batch  # noqa: E402

import rannc  # noqa: E402
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion  # noqa: E402


def median_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() between device syncs, after two warm-up runs."""
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[2:])
    return times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="bert/configs/bert_large.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    config = BertConfig.from_json_file(args.config_file)
    model = BertForPreTrainingWithCriterion(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(params, lr=0.0), verbose=False, compile=False)
    batch = make_batch(config, args.batch, 128, 20, device, 0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = wrapped(*batch)
    loss.backward()
    grads = [p.grad.clone() for p in params]

    def restore():
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    ours = median_ms(lambda: (restore(), wrapped.clip_grad_norm(1.0)), device, args.repeats)
    theirs = median_ms(lambda: (restore(), torch.nn.utils.clip_grad_norm_(params, 1.0)), device, args.repeats)
    copy = median_ms(restore, device, args.repeats)
    restore()
    norm_ours = wrapped.calc_grad_norm().item()
    norm_torch = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    result = {"config": args.config_file, "device": str(device), "params": sum(p.numel() for p in params),
              "rannc_clip_ms": ours - copy, "torch_clip_ms": theirs - copy, "restore_ms": copy,
              "ratio": (ours - copy) / max(theirs - copy, 1e-9), "norm_rannc": norm_ours, "norm_torch": norm_torch}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
