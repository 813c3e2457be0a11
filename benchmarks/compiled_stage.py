"""Whether rannc's stage modules compile, and what torch.compile gains on them against the plain model's
compile (the groundwork of a `compile` config item), at world size 1:

    torchrun --nproc_per_node=1 benchmarks/compiled_stage.py --config_file bert/configs/bert_large.json --batch 64

Times forward + backward (median of --repeats, device sync around each) of: the plain model eager and under
torch.compile, rannc's stage module eager and under torch.compile, with bf16 autocast on GPUs; reports the
compile time of each and whether the compiled stage's loss and gradients equal the eager stage's. Prints one
JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.clip_speed import median_ms  # noqa: E402
from benchmarks.step_overhead import deployed, one_device_bert  # noqa: E402
from bert.modeling import BertForPreTrainingWithCriterion  # noqa: E402


def main() -> None:
    args, device, config, batch, autocast = one_device_bert(__doc__)
    cuda = device.type == "cuda"
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = BertForPreTrainingWithCriterion(config).to(device)

    def step_of(fn):
        def step():
            with autocast:
                loss = fn()
            loss.backward()
            return loss
        return step

    def timed_compile(fn):
        started = time.perf_counter()
        step_of(fn)()
        step_of(fn)()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    result = {"plain_eager_ms": median_ms(step_of(lambda: model(*batch)), device, args.repeats)}
    compiled_model = torch.compile(model)
    result["plain_compile_s"] = timed_compile(lambda: compiled_model(*batch))
    result["plain_compiled_ms"] = median_ms(step_of(lambda: compiled_model(*batch)), device, args.repeats)
    model.zero_grad(set_to_none=True)

    stage = deployed(model, batch, autocast)[0]._engine.runtime.stage
    stage_args = [batch[i] for i in stage.inputs]
    result["stage_eager_ms"] = median_ms(step_of(lambda: stage.module(*stage_args)[0]), device, args.repeats)
    params = [q for q in stage.module.parameters() if q.requires_grad]
    for q in params:
        q.grad = None
    eager_loss = step_of(lambda: stage.module(*stage_args)[0])()
    eager_grads = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    compiled_stage = torch.compile(stage.module)
    result["stage_compile_s"] = timed_compile(lambda: compiled_stage(*stage_args)[0])
    for q in params:
        q.grad = None
    compiled_loss = step_of(lambda: compiled_stage(*stage_args)[0])()
    result["stage_loss_difference"] = abs(compiled_loss.item() - eager_loss.item())
    # against the largest gradient of all (a parameter's own scale would magnify bf16 rounding in tiny gradients)
    scale = max(g.abs().max().item() for g in eager_grads)
    result["stage_grad_max_difference_over_largest"] = max(
        (q.grad - g).abs().max().item() for q, g in zip(params, eager_grads)) / scale
    result["stage_compiled_ms"] = median_ms(step_of(lambda: compiled_stage(*stage_args)[0]), device, args.repeats)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
