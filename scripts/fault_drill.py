"""A failure injected on one rank of a real launch; prints what every rank raised and how long it took.

    torchrun --nproc_per_node=2 scripts/fault_drill.py --fault raise     # a rank raises in forward, stays alive
    torchrun --nproc_per_node=2 scripts/fault_drill.py --fault hang      # a rank hangs inside forward

The CPU suite (tests/test_faults.py) runs these on gloo ranks; this drill is for NCCL on GPUs, where a
blocked rank waits inside a GPU kernel and only the fault watchdog's abort wakes it. A 2-stage pipeline of an
MLP; the failure comes on the last rank at the third call. Exit code 0 when every other rank raised
rannc.RankFailure naming the failing rank in time (10 s for a raise, the timeout plus 15 s for a hang).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rannc  # noqa: E402
from rannc.runtime import pipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", choices=("raise", "hang"), default="raise")
    p.add_argument("--timeout_s", type=float, default=20.0, help="comm_timeout_s (a hang is named after it)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(8)], nn.Linear(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, comm_timeout_s=args.timeout_s)
    rank, world = rannc.get_rank(), rannc.get_world_size()
    faulty = world - 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    outcome, seconds = "finished", 0.0
    for step in range(5):
        if step == 2 and rank == faulty:
            def broken(self, *a, **k):
                if args.fault == "raise":
                    raise ValueError("injected forward failure")
                time.sleep(args.timeout_s + 30)
            pipeline.StageRuntime._forward_one = broken
        started = time.monotonic()
        try:
            x = torch.randn(32, 256, device=device)
            loss = wrapped(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            float(loss)  # waits for the device: a blocked collective shows here at the latest
        except rannc.RankFailure as exc:
            outcome, seconds = f"RankFailure: {exc}", time.monotonic() - started
            break
        except ValueError as exc:
            outcome, seconds = f"own: {exc}", time.monotonic() - started
            time.sleep(15)  # stay alive: the others must not need this process to end
            break
    print(json.dumps({"rank": rank, "fault": args.fault, "outcome": outcome[:300], "seconds": round(seconds, 2)}),
          flush=True)
    if rank == faulty:
        return 0
    limit = 10.0 if args.fault == "raise" else args.timeout_s + 15.0
    named = outcome.startswith(f"RankFailure: rank {faulty} ")
    return 0 if named and seconds < limit else 1


if __name__ == "__main__":
    sys.exit(main())
