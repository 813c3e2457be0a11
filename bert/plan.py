"""Print the plan rannc chooses for a BERT config on N devices, without running it (a dry run from
estimated profiles; the model is built on the meta device, so any size plans on a laptop).

    python -m bert.plan --config_file bert/configs/bert_4.9b.json --np 8 --device h200 --batch_size 64
    python -m bert.plan --np 8 --profile ~/.cache/rannc/profile_<key>.json   # from a one-GPU run's profile
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bert.modeling import BertConfig, BertForPreTrainingWithCriterion, count_parameters
from rannc.config import RannConfig
from rannc.deploy import plan_dry_run
from rannc.profile.estimate import DEVICES
from rannc.profile.profiles import ProfileSet


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="bert/configs/bert_4.9b.json")
    parser.add_argument("--np", type=int, default=8, help="number of devices to plan for")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h200")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch per optimizer micro-step")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_predictions_per_seq", type=int, default=20, help="rows of the masked MLM head")
    parser.add_argument("--full_sequence_mlm", action="store_true",
                        help="plan the seed's MLM head over every position instead of the masked positions")
    parser.add_argument("--mem_limit_gb", type=float, default=0.0)
    parser.add_argument("--partition_num", type=int, default=0)
    parser.add_argument("--png", default=None, help="draw the plan (stages, memory, simulated step) into this file")
    parser.add_argument("--profile", default=None,
                        help="a profile cache file of this model from a live first call (e.g. on one GPU): plan from "
                             "its measured block and optimizer times instead of estimates (links stay estimated)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    config = BertConfig.from_json_file(args.config_file)
    with torch.device("meta"):
        model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=args.full_sequence_mlm)
        b, s, p = 8, args.max_seq_length, args.max_predictions_per_seq
        ids = torch.zeros(b, s, dtype=torch.long)
        positions, masked_ids = torch.zeros(b, p, dtype=torch.long), torch.zeros(b, p, dtype=torch.long)
        mlm_targets = (ids,) if args.full_sequence_mlm else (positions, masked_ids)
        inputs = (ids, ids, torch.ones(b, s, dtype=torch.long), *mlm_targets, torch.zeros(b, dtype=torch.long))
    print(f"{args.config_file}: {count_parameters(model) / 1e9:.2f} B parameters")
    rannc_config = RannConfig(mem_limit_gb=args.mem_limit_gb, partition_num=args.partition_num)
    measured = ProfileSet.from_json(Path(args.profile).read_text()) if args.profile else None
    deployment = plan_dry_run(model, inputs, args.np, args.batch_size, DEVICES[args.device], rannc_config,
                              measured=measured)
    print(deployment.table())
    print(f"dry-run plan finished in {time.perf_counter() - t0:.1f} s (planning {deployment.planning_s:.2f} s)")
    if args.png:
        from rannc.plan.picture import draw
        print(f"drew {draw(deployment, args.png)}")
    return deployment


if __name__ == "__main__":
    main()
