"""BERT pretraining on rannc: NVIDIA's run_pretraining.py (DeepLearningExamples @65211bd) with the RaNNC seed's
changes. Launch one process per device: `torchrun --nproc_per_node=N -m bert.pretrain [NVIDIA's flags]`.

The rannc lines: wrap model and optimizer in `rannc.RaNNCModule`, delay its gradient all-reduce for accumulation
(`allreduce_grads_rannc`), clip by the whole model's gradient norm (`model.calc_grad_norm()` handed to LAMB, or
`model.clip_grad_norm` with --clip_with_model), and load optimizer state after the first backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import rannc
from bert.data import ShardedBatchLoader, prepare_default_data
from bert.loss_scaling import DynamicLossScaler, unscale_
from bert.modeling import BertConfig, BertForPreTrainingWithCriterion
from bert.optim import Lamb, bert_param_groups
from bert.schedulers import PolyWarmUpScheduler
from bert.step_values import StepValues

KEEP_CHECKPOINTS = 3  # NVIDIA keeps the newest three
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)\.pt")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BERT pretraining (MLM + NSP) with rannc; NVIDIA's flags.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--config_file", default="bert/configs/bert_tiny.json", help="BertConfig JSON")
    add("--input_dir", default=None,
        help="folder of HDF5 shards ('training' in the name); default: the bundled corpus, prepared once into "
             "data/default")
    add("--output_dir", default="runs/bert", help="checkpoints ckpt_<step>.pt and the dllogger JSON")
    add("--train_batch_size", type=int, default=16,
        help="samples per process per optimizer step, summed over the accumulation micro-steps")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    add("--max_steps", type=int, default=300, help="optimizer steps of the whole phase (the lr schedule's length)")
    add("--steps_this_run", type=int, default=-1,
        help="stop (with a checkpoint) after this many optimizer steps of this run; -1: run to max_steps")
    add("--learning_rate", type=float, default=2e-2, help="LAMB's peak learning rate")
    add("--warmup_proportion", type=float, default=0.05, help="linear warm-up, as a fraction of max_steps")
    add("--max_seq_length", type=int, default=128, help="sequence length of the default data")
    add("--max_predictions_per_seq", type=int, default=20, help="masked tokens per sequence of the default data")
    add("--phase2", action="store_true",
        help="phase 2: start from the newest phase-1 checkpoint in output_dir (weights and LAMB moments), step 0")
    add("--phase1_end_step", type=int, default=7038, help="phase 1's last step; phase-2 checkpoints count on it")
    add("--init_checkpoint", default=None, help="start a new phase at step 0 from this checkpoint file")
    add("--resume_from_checkpoint", action="store_true", help="continue from a checkpoint in output_dir")
    add("--resume_step", type=int, default=-1, help="the checkpoint's step to resume from; -1: the newest")
    add("--allreduce_post_accumulation", action="store_true",
        help="all-reduce gradients once per optimizer step, not after every micro-step")
    add("--seed", type=int, default=42, help="model init (all ranks), data order; dropout uses seed + rank")
    add("--bf16", action="store_true", help="bfloat16 autocast")
    add("--fp16", action="store_true", help="float16 autocast with dynamic loss scaling")
    add("--bf16_weights", action=argparse.BooleanOptionalAction, default=None,
        help="the model computes with bfloat16 weights, LAMB steps fp32 masters (rannc's param_dtype); "
             "checkpoints hold the masters. On by default with --bf16 (--no-bf16_weights: fp32 weights, cast "
             "by autocast at every use)")
    add("--init_loss_scale", type=float, default=2.0**20, help="first loss scale of --fp16")
    add("--log_freq", type=int, default=1, help="optimizer steps between dllogger records")
    add("--num_steps_per_checkpoint", type=int, default=100, help="optimizer steps between checkpoints")
    add("--skip_checkpoint", action="store_true", help="write no checkpoints")
    add("--disable_progress_bar", action="store_true", help="print log lines instead of a progress bar")
    add("--json-summary", dest="json_summary", default=None,
        help="dllogger JSON lines ('DLLL {...}'); default: output_dir/dllogger.json")
    add("--partition_num", type=int, default=None,
        help="rannc: force this many pipeline stages (default: rannc's planner decides, or RANNC_PARTITION_NUM)")
    add("--no_dropout", action="store_true", help="turn dropout off (for exact comparisons)")
    add("--full_sequence_mlm", action="store_true",
        help="the seed's MLM head: score every position against the vocab (B x S x V logits) with dense labels; "
             "default: only the masked positions (B x max_predictions_per_seq), the same loss")
    add("--clip_with_model", action="store_true",
        help="the seed's clipping: model.clip_grad_norm(1.0) rewrites every gradient before LAMB reads it; "
             "default: LAMB divides by the whole model's norm (model.calc_grad_norm()) inside its update, as "
             "NVIDIA's FusedLAMB clips, reading the gradients once less")
    compat = parser.add_argument_group("accepted for NVIDIA's command lines; no effect here")
    compat.add_argument("--bert_model", default=None, help="unused by NVIDIA too")
    compat.add_argument("--do_train", action="store_true", help="training is all this script does")
    compat.add_argument("--local_rank", type=int, default=None, help="ranks come from the launcher's environment")
    compat.add_argument("--allreduce_post_accumulation_fp16", action="store_true",
                        help="rannc all-reduces gradients in their own dtype")
    compat.add_argument("--checkpoint_activations", action="store_true",
                        help="rannc decides recomputation per stage")
    args = parser.parse_args(argv)

    if args.bf16 and args.fp16:
        parser.error("choose one of --bf16 and --fp16")
    if args.bf16_weights and not args.bf16:
        parser.error("--bf16_weights needs --bf16 (bfloat16 autocast around the model)")
    if args.bf16_weights is None:
        args.bf16_weights = args.bf16
    k = args.gradient_accumulation_steps
    if k < 1 or args.train_batch_size % k != 0:
        parser.error(f"--train_batch_size ({args.train_batch_size}) must be a multiple of "
                     f"--gradient_accumulation_steps ({k})")
    if k == 1:
        args.allreduce_post_accumulation = False  # as NVIDIA: nothing to accumulate
    if args.json_summary is None:
        args.json_summary = str(Path(args.output_dir) / "dllogger.json")
    return args


class DLLogger:
    """NVIDIA's dllogger JSON stream: one `DLLL {json}` line per record. A no-op off rank 0."""

    def __init__(self, path: str, enabled: bool, append: bool):
        self.start = time.time()
        self.file = None
        if enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if append else "w")

    def log(self, step, data: dict) -> None:
        if self.file is None:
            return
        now = time.time()
        record = {"timestamp": now, "datetime": str(datetime.datetime.fromtimestamp(now)),
                  "elapsedtime": now - self.start, "type": "LOG", "step": step, "data": data}
        self.file.write(f"DLLL {json.dumps(record)}\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def prepare_data(args: argparse.Namespace, rank: int) -> Path:
    """The shards to train on: --input_dir, or the bundled corpus prepared (once, cached) by rank 0."""
    if args.input_dir is not None:
        return Path(args.input_dir)
    folder = Path("data/default")
    if (args.max_seq_length, args.max_predictions_per_seq) != (128, 20):
        folder = Path(f"data/default_seq{args.max_seq_length}_pred{args.max_predictions_per_seq}")
    if rank == 0:
        prepare_default_data(folder, max_seq_length=args.max_seq_length,
                             max_predictions_per_seq=args.max_predictions_per_seq,
                             show_progress=not args.disable_progress_bar and sys.stderr.isatty())
    rannc.barrier()  # the others wait for rank 0's shards
    return folder


def check_vocab(input_dir: Path, config: BertConfig) -> None:
    """Token ids index the embedding; a larger vocab than the config's would fail deep inside the first call."""
    vocab_file = input_dir / "vocab.txt"
    if vocab_file.is_file():
        vocab_size = len(vocab_file.read_text(encoding="utf-8").splitlines())
        if vocab_size > config.vocab_size:
            raise ValueError(f"{vocab_file} has {vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; use a --config_file with vocab_size >= {vocab_size}")


def prepare_model_and_optimizer(args: argparse.Namespace):
    config = BertConfig.from_json_file(args.config_file)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=args.full_sequence_mlm)
    # Lamb's own norm would be this rank's part of the model's: take_optimizer_step hands it the whole model's
    # (or, with --clip_with_model, clips globally before a step that does not clip).
    optimizer = Lamb(bert_param_groups(model, weight_decay=0.01), lr=args.learning_rate,
                     max_grad_norm=0 if args.clip_with_model else 1.0)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=args.max_steps)
    return config, model, optimizer, scheduler


# ---- checkpoints ------------------------------------------------------------------------------------------
def checkpoint_steps(output_dir: Path) -> list[int]:
    """The N of every ckpt_N.pt in output_dir, ascending."""
    if not output_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in output_dir.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name)))


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint to start from: --init_checkpoint, else with --resume_from_checkpoint or --phase2 the
    one of --resume_step, or the newest in output_dir (None if there is none yet: a fresh start)."""
    if args.init_checkpoint:
        return Path(args.init_checkpoint)
    if not (args.resume_from_checkpoint or args.phase2):
        return None
    output_dir = Path(args.output_dir)
    steps = checkpoint_steps(output_dir)
    if args.resume_step >= 0:
        if args.resume_step not in steps:
            raise FileNotFoundError(f"no ckpt_{args.resume_step}.pt in {output_dir} (found steps {steps})")
        return output_dir / f"ckpt_{args.resume_step}.pt"
    if not steps:
        if args.phase2:
            raise FileNotFoundError(f"--phase2 starts from phase 1's checkpoint, but {output_dir} has none; "
                                    f"run phase 1 with the same --output_dir first")
        return None
    return output_dir / f"ckpt_{steps[-1]}.pt"


def agree_on(value):
    """Rank 0's value on every rank (after RaNNCModule has joined the process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def training_state(args: argparse.Namespace, model: rannc.RaNNCModule, optimizer: torch.optim.Optimizer,
                   loss_scaler: DynamicLossScaler | None, loader: ShardedBatchLoader, global_step: int) -> dict:
    """Everything a resumed run needs. Collective: model and optimizer state are gathered from all ranks
    (the model's only onto rank 0; the optimizer's onto every rank)."""
    return {"model": model.state_dict(sync_all_ranks=False, no_hook=True),
            "optimizer": optimizer.state_dict(),
            "rng": rank_rng_states(),
            "deployment": model.deployment.to_json(),
            "loss_scaler": None if loss_scaler is None else loss_scaler.state_dict(),
            "data_loader": loader.state_dict(), "global_step": global_step, "phase2": args.phase2,
            "phase1_end_step": args.phase1_end_step, "args": vars(args)}


def rank_rng_states() -> list[dict]:
    """Every rank's random generator states (CPU, and its GPU's), in rank order: dropout draws from them, so a
    resumed run that restores them draws the masks the uninterrupted run drew. Collective."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def resumed_deployment(checkpoint: dict, args: argparse.Namespace, rank: int, world_size: int,
                       call_batch_size: int) -> Path | None:
    """The checkpoint's plan as a file for RaNNCModule(load_deployment=), when it fits this run (same number of
    processes and global batch per call); else None, and a fresh plan. Planning anew would split the model by
    this run's profiling noise, and another split draws dropout masks on other ranks and sums in another order:
    the resumed losses would drift from the uninterrupted run's. A --partition_num other than the plan's stage
    count plans anew too. Rank 0 (the one that reads it) writes it."""
    text = checkpoint.get("deployment")
    if not text:
        return None
    deployment = rannc.Deployment.from_json(text)
    depth = deployment.pipeline_depth
    stages = args.partition_num or depth
    if (deployment.world_size, deployment.batch_size, depth) != (world_size, call_batch_size, stages):
        if rank == 0:
            print(f"note: the checkpoint's plan was made for {deployment.world_size} process(es), batch "
                  f"{deployment.batch_size} per call and {depth} stage(s); this run has "
                  f"{world_size}, {call_batch_size} and --partition_num {args.partition_num}: planning anew",
                  flush=True)
        return None
    path = Path(args.output_dir) / "resumed_deployment.json"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        deployment.save(path)
    return path


def restore_rng_states(states: list[dict] | None, rank: int, world_size: int) -> None:
    """Set this rank's generators from a checkpoint's; with another world size they cannot match, so say so."""
    if not states:
        return
    if len(states) != world_size:
        if rank == 0:
            print(f"note: the checkpoint holds random states of {len(states)} ranks, this run has {world_size}: "
                  f"dropout masks will differ from an uninterrupted run")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def load_checkpoint(path: Path, args: argparse.Namespace, rank: int) -> tuple[Path, dict]:
    """The checkpoint at `path`; when it is the newest of output_dir and cannot be read (a run killed while
    writing, a full disk), the next older one that can, saying which was skipped and why. Every rank sees the
    same files, so every rank makes the same choice."""
    candidates = [path]
    automatic = not args.init_checkpoint and args.resume_step < 0
    if automatic:
        newest = int(CHECKPOINT_NAME.fullmatch(path.name).group(1))
        candidates += [path.parent / f"ckpt_{s}.pt" for s in reversed(checkpoint_steps(path.parent)) if s < newest]
    problems = []
    for candidate in candidates:
        try:
            return candidate, torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn zip, a truncated pickle, an unreadable file: all mean "not usable"
            problems.append(f"{candidate}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if rank == 0:
                print(f"warning: cannot read checkpoint {candidate} ({problems[-1].split(': ', 1)[1]})"
                      + ("; trying the previous one" if automatic else ""), flush=True)
    raise RuntimeError("no usable checkpoint: " + "; ".join(problems))


def restart_schedule(optimizer_state: dict, learning_rate: float) -> dict:
    """A new phase keeps LAMB's moments but restarts the step count (bias correction, warm-up) at 0, as NVIDIA."""
    for group in optimizer_state["param_groups"]:
        group["step"] = 0
        group["lr"] = group["initial_lr"] = learning_rate
    return optimizer_state


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash leaves the old files whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_old_checkpoints(args: argparse.Namespace, newest: int) -> None:
    """Keep the newest KEEP_CHECKPOINTS up to ckpt_<newest> (just written) of this phase. Phase 2 never removes
    phase 1's, and later steps left by an earlier run are not this run's to remove (it overwrites them)."""
    output_dir = Path(args.output_dir)
    steps = [s for s in checkpoint_steps(output_dir) if s <= newest and (not args.phase2 or s > args.phase1_end_step)]
    for step in steps[:-KEEP_CHECKPOINTS]:
        (output_dir / f"ckpt_{step}.pt").unlink(missing_ok=True)


# ---- one optimizer step -----------------------------------------------------------------------------------
def rannc_plan(model: rannc.RaNNCModule) -> dict:
    plan = model.deployment
    return {"stages": plan.pipeline_depth, "replicas": plan.replicas, "microbatches": plan.microbatch_count}


def rannc_pieces(model: rannc.RaNNCModule) -> dict:
    """Where the plan cuts the model and how it schedules the pieces: two runs with these equal compute alike."""
    plan = model.deployment
    return {"schedule": plan.schedule, "pieces": [(s.start, s.end, s.ranks, s.recompute) for s in plan.stages]}


def rank_device() -> torch.device:
    """This process's device, where rannc wants its inputs (under NCCL everything is CUDA)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def scale_grads(model: rannc.RaNNCModule, factor: float, loss_scaler: DynamicLossScaler | None) -> bool:
    """Multiply this rank's gradients by `factor` and undo fp16 loss scaling; True if any rank's overflowed."""
    params = [p for p in model.parameters() if p.grad is not None]  # only this rank's parameters have grads
    if loss_scaler is not None:
        if loss_scaler.has_overflow(params, reduce_fn=max_over_ranks, device=rank_device()):
            return True
        factor /= loss_scaler.scale
    if factor != 1.0:
        unscale_(params, factor)
    return False


def max_over_ranks(flag: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def allreduce_grads_rannc(model: rannc.RaNNCModule, optimizer: torch.optim.Optimizer, prescale: float = 1.0,
                          loss_scaler: DynamicLossScaler | None = None) -> bool:
    """The seed's helper for delay_grad_allreduce(True): sum gradients over ranks, then scale them by
    `prescale` (1 / accumulation steps) and undo loss scaling. Returns had_overflow (always False without fp16).
    The optimizer stays in the signature of RaNNC's script; rannc's patch keeps only local parameters in it."""
    model.allreduce_grads()
    return scale_grads(model, prescale, loss_scaler)


def take_optimizer_step(args: argparse.Namespace, model: rannc.RaNNCModule, optimizer: torch.optim.Optimizer,
                        scheduler: PolyWarmUpScheduler, loss_scaler: DynamicLossScaler | None) -> torch.Tensor | None:
    """All-reduce (if delayed), unscale, clip, step. Returns the gradients' global norm before clipping (a device
    tensor, read when the step is logged), or None when fp16 overflowed and the step was skipped."""
    if args.allreduce_post_accumulation:
        had_overflow = allreduce_grads_rannc(model, optimizer, 1. / args.gradient_accumulation_steps, loss_scaler)
    else:
        had_overflow = scale_grads(model, 1.0, loss_scaler)  # rannc reduced them in backward
    if loss_scaler is not None:
        loss_scaler.update(had_overflow)
    grad_norm = None
    if not had_overflow:
        if args.clip_with_model:
            grad_norm = model.clip_grad_norm(1.0)
            clipping = {}
        else:
            grad_norm = model.calc_grad_norm()
            clipping = {"grad_norm": grad_norm}
        scheduler.step()  # lr from the optimizer's step counter, so skipped steps do not advance it
        optimizer.step(**clipping)
    model.zero_grad(set_to_none=True)
    return grad_norm


# ---- the run ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    run_start = time.perf_counter()
    args = parse_arguments(argv)
    config, model, optimizer, scheduler = prepare_model_and_optimizer(args)  # model and optimizer as NVIDIA's
    rank, world_size = rannc.get_rank(), rannc.get_world_size()
    k = args.gradient_accumulation_steps

    # Weights go in before the first call; optimizer state after the first backward, once rannc has partitioned.
    # Every rank reads the same output_dir, so every rank picks the same checkpoint (checked below).
    global_step, global_optimizer_state, checkpoint = 0, None, None
    checkpoint_path = find_checkpoint(args)
    if checkpoint_path is not None:
        checkpoint_path, checkpoint = load_checkpoint(checkpoint_path, args, rank)
    new_phase = checkpoint is not None and (bool(args.init_checkpoint) or (args.phase2 and not checkpoint["phase2"]))
    if checkpoint is not None and not new_phase and rank == 0:
        saved = bool(checkpoint.get("args", {}).get("bf16_weights", False))   # runs before --bf16 implied it
        if saved != args.bf16_weights:
            kinds = {True: "bf16 weights", False: "fp32 weights"}
            print(f"warning: {checkpoint_path} was trained with {kinds[saved]}, and this run computes with "
                  f"{kinds[args.bf16_weights]}: its fp32 masters carry over, but the run will not match an "
                  f"uninterrupted one; pass {'--bf16_weights' if saved else '--no-bf16_weights'} to keep its "
                  f"choice", flush=True)

    run_options = {"param_dtype": "bfloat16"} if args.bf16_weights else {}
    # the items that hold with a loaded plan too; clipping inside LAMB's update is part of the optimizer step that
    # rannc times, with no clipping apart to price
    run_options["plan_grad_clipping"] = args.clip_with_model
    rannc_options = {**({} if args.partition_num is None else {"partition_num": args.partition_num}), **run_options}
    deployment_file = None
    if checkpoint is not None and not new_phase:
        call_batch = (args.train_batch_size // k) * world_size
        deployment_file = resumed_deployment(checkpoint, args, rank, world_size, call_batch)
    if deployment_file is not None:
        rannc_options = {"load_deployment": str(deployment_file), **run_options}
    model = rannc.RaNNCModule(model, optimizer, **rannc_options)
    rannc.delay_grad_allreduce(args.allreduce_post_accumulation)
    if args.no_dropout:
        model.enable_dropout(False)
    if agree_on(str(checkpoint_path)) != str(checkpoint_path):
        raise RuntimeError(f"rank {rank} would resume from {checkpoint_path} but rank 0 from another checkpoint: "
                           f"every rank must see the same --output_dir")
    device = rank_device()
    torch.manual_seed(args.seed + rank)  # dropout differs across ranks, as in NVIDIA's script

    input_dir = prepare_data(args, rank)
    check_vocab(input_dir, config)
    loader = ShardedBatchLoader(input_dir, args.train_batch_size // k, rank, world_size, seed=args.seed,
                                full_sequence_mlm=args.full_sequence_mlm)
    loss_scaler = DynamicLossScaler(init_scale=args.init_loss_scale) if args.fp16 else None
    amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None

    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        global_optimizer_state = checkpoint.get("optimizer")
        if new_phase:
            if global_optimizer_state:
                global_optimizer_state = restart_schedule(global_optimizer_state, args.learning_rate)
        else:
            global_step = checkpoint["global_step"]
            loader.load_state_dict(checkpoint["data_loader"])
            restore_rng_states(checkpoint.get("rng"), rank, world_size)
            if loss_scaler is not None and checkpoint["loss_scaler"] is not None:
                loss_scaler.load_state_dict(checkpoint["loss_scaler"])
        checkpoint = None
    stop_step = args.max_steps if args.steps_this_run < 0 else min(args.max_steps, global_step + args.steps_this_run)

    is_main = rank == 0
    if is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        resumed = f"from {checkpoint_path} at step {global_step}" if checkpoint_path else "from scratch"
        if checkpoint_path is None and checkpoint_steps(Path(args.output_dir)) and not args.skip_checkpoint:
            print(f"note: {args.output_dir} holds checkpoints of an earlier run; this one overwrites them step by "
                  f"step (--resume_from_checkpoint would continue the newest)")
        print(f"BERT pretraining on {world_size} process(es), {device.type}: {args.config_file}, data {input_dir}, "
              f"global batch {args.train_batch_size * world_size} ({k} micro-step(s)), {resumed}", flush=True)
    dllogger = DLLogger(args.json_summary, is_main, append=checkpoint_path is not None)
    dllogger.log("PARAMETER", {"Config": [str(args)]})
    dllogger.log("PARAMETER", {"SEED": args.seed, "world_size": world_size, "batch_size_per_gpu": args.train_batch_size,
                               "learning_rate": args.learning_rate, "train_start": True})

    model.train()
    # disable=None: no bar when stderr is not a terminal (a log file gets the step lines below instead of
    # carriage-return redraws). rannc's own log lines go through tqdm.write (rannc.log), above the bar.
    progress = tqdm(total=args.max_steps, initial=global_step, desc="Iteration", unit="step",
                    disable=True if args.disable_progress_bar or not is_main else None)
    samples_per_step = args.train_batch_size * world_size
    losses: list[float] = []
    grad_norms: list[float] = []
    final_loss = None
    average_loss, steps_since_log, skipped_steps = 0.0, 0, 0
    first_step_s, steady_start, steady_steps = 0.0, None, 0  # the first call includes rannc's planning
    pending = StepValues()   # each step's loss and gradient norm on their way to the host: no waiting on them

    def record(step: int, values: list[float], extra: tuple) -> None:
        """One step's values have reached the host: keep them, and write the log record where one is due."""
        nonlocal average_loss, steps_since_log, final_loss
        step_loss, grad_norm = values
        epoch, lr, step_s = extra
        losses.append(step_loss)
        grad_norms.append(grad_norm)
        average_loss += step_loss
        steps_since_log += 1
        progress.set_postfix(loss=f"{step_loss:.4f}", seq_s=f"{samples_per_step / step_s:.1f}",
                             step_ms=f"{1000 * step_s:.0f}", refresh=False)
        if step % args.log_freq == 0 or step >= stop_step:
            average_loss /= steps_since_log
            dllogger.log([epoch, step], {"average_loss": average_loss, "step_loss": step_loss,
                                         "learning_rate": lr, "grad_norm": grad_norm})
            if progress.disable and is_main:  # no bar (flag, or not a terminal): one line per record
                tqdm.write(f"step {step}: average_loss {average_loss:.4f} step_loss {step_loss:.4f} "
                           f"learning_rate {lr:.3e} grad_norm {grad_norm:.3f} step_ms {1000 * step_s:.0f}",
                           file=sys.stdout)
                sys.stdout.flush()
            final_loss, average_loss, steps_since_log = average_loss, 0.0, 0

    while global_step < stop_step:
        step_start = time.perf_counter()
        step_loss = None
        for _ in range(k):
            batch = [t.to(device) for t in next(loader)]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # (input_ids, token_type_ids=segment_ids, attention_mask=input_mask, masked_lm_positions,
                #  masked_lm_ids, nsp labels); with --full_sequence_mlm dense masked_lm_labels replace the two
                loss = model(*batch)  # the loss of the global batch, the same on every rank
            part = loss.detach() / k  # summed on the device and read steps later (StepValues), not here
            step_loss = part if step_loss is None else step_loss + part
            if not args.allreduce_post_accumulation:
                loss = loss / k  # backward all-reduces every micro-step, so average here (NVIDIA's way)
            if loss_scaler is not None:
                loss = loss * loss_scaler.scale
            loss.backward()
            # Restore optimizer's state AFTER partitioning (the seed's pattern)
            if global_optimizer_state:
                optimizer.load_state_dict(global_optimizer_state)
                global_optimizer_state = None

        grad_norm = take_optimizer_step(args, model, optimizer, scheduler, loss_scaler)
        if grad_norm is None:
            skipped_steps += 1
            dllogger.log("PARAMETER", {"loss_scale": loss_scaler.scale})
            continue
        global_step += 1
        step_s = time.perf_counter() - step_start
        if steady_start is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # the steady window starts with the first step done
            first_step_s, steady_start = time.perf_counter() - step_start, time.perf_counter()
            step_s = first_step_s
            dllogger.log("PARAMETER", {"rannc_plan": rannc_plan(model), "first_step_time": first_step_s})
        else:
            steady_steps += 1
        pending.put(global_step, [step_loss, grad_norm], (loader.epoch, scheduler.get_last_lr()[0], step_s))
        progress.update(1)
        checkpoint_due = not args.skip_checkpoint and (global_step % args.num_steps_per_checkpoint == 0
                                                       or global_step >= stop_step)
        for step, values, extra in pending.ready(wait=checkpoint_due or global_step >= stop_step):
            record(step, values, extra)

        if checkpoint_due:
            state = training_state(args, model, optimizer, loss_scaler, loader, global_step)  # every rank gathers
            if is_main:
                number = global_step + args.phase1_end_step if args.phase2 else global_step
                save_checkpoint(state, Path(args.output_dir) / f"ckpt_{number}.pt")
                remove_old_checkpoints(args, number)
            del state
            rannc.barrier()  # the file is in place before any rank goes on (and may look for it)
    progress.close()

    train_s = time.perf_counter() - run_start
    if steady_start is not None and steady_steps > 0:
        samples_per_second = steady_steps * samples_per_step / (time.perf_counter() - steady_start)
    else:
        samples_per_second = len(losses) * samples_per_step / max(first_step_s, 1e-9)
    summary = {"losses": losses, "grad_norms": grad_norms, "final_loss": final_loss,
               "samples_per_second": samples_per_second, "global_step": global_step,
               "skipped_steps": skipped_steps, "e2e_train_time": train_s, "first_step_time": first_step_s,
               "rannc_plan": rannc_plan(model) if model.deployment is not None else None,
               "rannc_pieces": rannc_pieces(model) if model.deployment is not None else None}
    dllogger.log([], {"e2e_train_time": train_s, "training_sequences_per_second": samples_per_second,
                      "final_loss": summary["final_loss"], "first_step_time": first_step_s})
    dllogger.close()
    if is_main and not losses:
        print(f"nothing to do: at step {global_step} of {args.max_steps}", flush=True)
    elif is_main:
        print(f"done: step {global_step}/{args.max_steps}, loss {losses[0]:.4f} -> {summary['final_loss']:.4f}, "
              f"{samples_per_second:.1f} sequences/s (after the first step; that one, with rannc's planning, took "
              f"{first_step_s:.1f} s), {train_s:.1f} s in all", flush=True)
    return summary


if __name__ == "__main__":
    main()
    rannc.clear()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
