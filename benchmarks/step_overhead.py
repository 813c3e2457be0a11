"""Where rannc's forward spends time beyond the model's, at world size 1 on one device (issue: rannc at world
size 1 should cost no more than the plain model).

    torchrun --nproc_per_node=1 benchmarks/step_overhead.py --config_file bert/configs/bert_large.json --batch 64

Times, each the median of --repeats runs with a device sync before and after: the plain model's forward
and backward, rannc's stage module called directly, and rannc's whole call; then a cProfile of rannc's calls
(host time, top functions by own time). Prints one JSON line and the profile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys

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
    """The model wrapped by rannc (LAMB, nothing accumulated) after its first call, which deploys it."""
    wrapped = rannc.RaNNCModule(model, Lamb(bert_param_groups(model), lr=1e-4, max_grad_norm=0),
                                accumulate_grads=False)
    with autocast:
        wrapped(*batch).backward()
    return wrapped


def main() -> None:
    args, device, config, batch, autocast = one_device_bert(__doc__)
    torch.manual_seed(0)
    model = BertForPreTrainingWithCriterion(config).to(device)

    def eager_forward():
        with autocast:
            return model(*batch)

    def eager_step():
        eager_forward().backward()
        model.zero_grad(set_to_none=True)

    result = {"eager_forward_ms": median_ms(eager_forward, device, args.repeats),
              "eager_forward_backward_ms": median_ms(eager_step, device, args.repeats)}
    wrapped = deployed(model, batch, autocast)
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

    result.update(stage_module_forward_ms=median_ms(stage_forward, device, args.repeats),
                  rannc_forward_ms=median_ms(rannc_forward, device, args.repeats),
                  rannc_forward_backward_ms=median_ms(rannc_step, device, args.repeats))
    print(json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        rannc_step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
