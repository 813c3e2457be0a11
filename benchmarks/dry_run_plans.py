"""Dry-run plans of the BERT models for machines one does not have: capture each model once (on the meta
device), estimate its profiles from a datasheet and plan for each device count, timing every part.

    python benchmarks/dry_run_plans.py            # the table in README.md and docs/benchmarks.md

The batch is the seed's: 64 sequences per step on 8 devices (8 per device), scaled with the device count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bert.modeling import BertConfig, BertForPreTrainingWithCriterion, count_parameters  # noqa: E402
from rannc.config import RannConfig  # noqa: E402
from rannc.deploy import capture_blocks  # noqa: E402
from rannc.plan.planner import plan  # noqa: E402
from rannc.profile.estimate import DEVICES, estimate_profiles  # noqa: E402

CASES = [("bert_large", "h100", 4, 256), ("bert_4.9b", "h100", 8, 64), ("bert_4.9b", "h200", 8, 64),
         ("bert_4.9b", "h100", 64, 512), ("bert_4.9b", "h100", 1024, 8192)]


def example(config_file: str):
    config = BertConfig.from_json_file(config_file)
    with torch.device("meta"):
        model = BertForPreTrainingWithCriterion(config)
        b, s, p = 8, 128, 20
        ids = torch.zeros(b, s, dtype=torch.long)
        inputs = (ids, ids, torch.ones(b, s, dtype=torch.long), torch.zeros(b, p, dtype=torch.long),
                  torch.zeros(b, p, dtype=torch.long), torch.zeros(b, dtype=torch.long))
    return model, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png_dir", default="", help="also draw every plan into this folder")
    parser.add_argument("--schedule", default="auto", help="the schedule config item (auto: the planner chooses)")
    args = parser.parse_args()
    captured_models = {}
    rows = []
    for name, device, count, batch in CASES:
        if name not in captured_models:
            model, inputs = example(f"bert/configs/{name}.json")
            t0 = time.perf_counter()
            captured, lin, blocks = capture_blocks(model, inputs, RannConfig())
            captured_models[name] = (captured, lin, blocks, time.perf_counter() - t0, count_parameters(model))
        captured, lin, blocks, capture_s, params = captured_models[name]
        spec = DEVICES[device]
        t0 = time.perf_counter()
        profile = estimate_profiles(captured, lin, blocks, spec)
        deployment = plan(profile, blocks, count, batch, RannConfig(schedule=args.schedule), captured.fingerprint)
        plan_s = time.perf_counter() - t0
        recomputed = sum(s.recompute for s in deployment.stages)
        peak = deployment.peak_memory_bytes() / 2**30
        rows.append(f"| {name} ({params / 1e9:.2f} B) | {count} x {spec.name.split(' (')[0]} | {batch} | "
                    f"{_schedule(deployment)} | {deployment.pipeline_depth} x {deployment.replicas} | "
                    f"{deployment.microbatch_count} | {recomputed} | {deployment.predicted_step_ms:.1f} | "
                    f"{deployment.bubble_fraction:.0%} | {peak:.1f} | "
                    f"{capture_s:.1f} | {plan_s:.2f} |")
        print(rows[-1], flush=True)
        if args.png_dir:
            from rannc.plan.picture import draw
            draw(deployment, os.path.join(args.png_dir, f"{name}_{device}_{count}.png"))
    print("| model | devices | batch | schedule | stages x replicas | micro-batches | recomputing stages "
          "| predicted step ms | bubble | peak GiB/device | capture s | estimate + plan s |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


def _schedule(deployment) -> str:
    v = deployment.virtual_stages
    return deployment.schedule + (f" (v={v})" if v > 1 else "")


if __name__ == "__main__":
    main()
