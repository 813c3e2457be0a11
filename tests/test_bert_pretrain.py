"""bert/pretrain.py end to end on gloo ranks: the tiny model learns, pipeline training equals single-process
training, the seed's full-sequence MLM head trains as the default masked head does, a stopped and resumed run
equals an uninterrupted one, and a crash while writing a checkpoint leaves the previous ones whole."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

import rannc
from bert.data import prepare_default_data
from bert.pretrain import save_checkpoint

from distributed import RankError, run_ranks

REPO = Path(__file__).resolve().parents[1]
# rannc weighs micro-batch losses by rows, and BERT's MLM loss is a mean over each micro-batch's masked tokens,
# so the loss of a global batch depends on how it is cut. The masked head keeps this so: every sample has
# max_predictions_per_seq prediction slots, but only round(0.15 x length) of them hold a label (at most 19 of 20
# at seq 128; padding slots are ignored), so micro-batches still differ in their label counts. Fixing the
# micro-batch count makes the cut the same in runs that are compared.
TWO_MICROBATCHES = {"RANNC_MIN_PIPELINE": "2", "RANNC_MAX_PIPELINE": "2"}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The default shards (what `./scripts/main.sh` trains on), prepared once and cached in data/default."""
    return prepare_default_data(REPO / "data" / "default", show_progress=False)


def _pretrain(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """bert.pretrain.main for each argument list in turn, in this rank's process."""
    from bert import pretrain

    return [pretrain.main(argv) for argv in runs]


def _args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--input_dir", str(data_dir), "--output_dir", str(output_dir), "--disable_progress_bar", *extra]


def test_tiny_bert_loss_falls_by_30_percent_in_300_steps(data_dir, tmp_path):
    """The acceptance of the main command: its defaults (LAMB lr 2e-2, 5% warm-up) on the default data, 300
    steps, in one process with batch 8 to keep the test near a minute (falls ~34%; main.sh, 2 x 16: ~35%)."""
    argv = _args(data_dir, tmp_path, "--max_steps", "300", "--train_batch_size", "8", "--skip_checkpoint")
    [[summary]] = run_ranks(_pretrain, 1, [argv], timeout=300)
    losses = summary["losses"]
    assert len(losses) == 300 and summary["global_step"] == 300
    first, last = losses[0], statistics.mean(losses[-10:])
    assert last <= 0.7 * first, f"loss fell from {first:.3f} to {last:.3f} only ({1 - last / first:.1%})"


def test_pipeline_of_two_stages_matches_single_process(data_dir, tmp_path):
    """A pipeline of 2 stages on 2 ranks against 1 process, with the same global batch (2 x 8 = 16 per step, in
    2 accumulation micro-steps), dropout off: 20 equal step losses (equal to the last bit on this CPU).

    Both runs cut each micro-step's 8 samples into the same 2 micro-batches (TWO_MICROBATCHES). Left to the
    planner, the pipeline takes 8 micro-batches and the single process 1, and the losses differ by ~2e-3
    relative: the MLM loss is a mean over each micro-batch's masked tokens, and rannc weighs micro-batches by
    rows, so a different cut is a (slightly) different loss, not an error."""
    common = ("--max_steps", "20", "--gradient_accumulation_steps", "2", "--no_dropout", "--skip_checkpoint")
    [[pipeline], _] = run_ranks(_pretrain, 2, [_args(data_dir, tmp_path / "p", *common, "--train_batch_size", "8",
                                                     "--partition_num", "2")],
                                timeout=300, env=TWO_MICROBATCHES)
    [[single]] = run_ranks(_pretrain, 1, [_args(data_dir, tmp_path / "s", *common, "--train_batch_size", "16")],
                           timeout=300, env=TWO_MICROBATCHES)
    assert pipeline["rannc_plan"] == {"stages": 2, "replicas": 1, "microbatches": 2}
    assert single["rannc_plan"] == {"stages": 1, "replicas": 1, "microbatches": 2}
    assert len(pipeline["losses"]) == len(single["losses"]) == 20
    assert single["losses"][-1] < single["losses"][0] - 0.1  # it trains, so later steps test the updates too
    torch.testing.assert_close(torch.tensor(pipeline["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)


def test_clipping_inside_lamb_gives_the_seeds_clipping_apart(data_dir, tmp_path):
    """Two stages on 2 ranks, dropout off: LAMB dividing by the whole model's norm inside its update (the
    default) against the seed's model.clip_grad_norm(1.0) before a LAMB step that does not clip: the same
    norms and losses to rounding (torch's factor is 1 / (norm + 1e-6), apex's 1 / norm), over steps that clip.
    Each stage clipping by its own part's norm would not give them."""
    common = ("--max_steps", "6", "--train_batch_size", "8", "--partition_num", "2", "--no_dropout",
              "--skip_checkpoint")
    runs = [_args(data_dir, tmp_path / "inside", *common), _args(data_dir, tmp_path / "apart", *common,
                                                                 "--clip_with_model")]
    [[inside, apart], _] = run_ranks(_pretrain, 2, runs, timeout=300, env=TWO_MICROBATCHES)
    assert inside["rannc_plan"]["stages"] == apart["rannc_plan"]["stages"] == 2
    assert len(inside["grad_norms"]) == len(apart["losses"]) == 6
    assert sum(norm > 1.0 for norm in inside["grad_norms"]) >= 3   # the steps compared clip
    torch.testing.assert_close(torch.tensor(inside["grad_norms"]), torch.tensor(apart["grad_norms"]), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(torch.tensor(inside["losses"]), torch.tensor(apart["losses"]), rtol=1e-5, atol=0)


def test_full_sequence_mlm_head_gives_the_default_heads_losses(data_dir, tmp_path):
    """--full_sequence_mlm (the seed's head: every position scored, dense labels) against the default head (the
    masked positions only), same data and weights, dropout off, one process: 5 equal step losses. The two
    heads' losses and gradients agree to rounding (tests/test_bert_modeling.py); this checks the flag's path
    through the loader and the model."""
    common = ("--max_steps", "5", "--train_batch_size", "8", "--no_dropout", "--skip_checkpoint")
    runs = [_args(data_dir, tmp_path / "masked", *common),
            _args(data_dir, tmp_path / "full", *common, "--full_sequence_mlm")]
    [[masked, full]] = run_ranks(_pretrain, 1, runs, timeout=300, env=TWO_MICROBATCHES)
    assert masked["rannc_plan"] == full["rannc_plan"] == {"stages": 1, "replicas": 1, "microbatches": 2}
    assert len(masked["losses"]) == len(full["losses"]) == 5
    torch.testing.assert_close(torch.tensor(masked["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=0)


# one process with bf16 weights (--bf16's default: the direct path of world size 1 with fp32 masters), data
# parallel, 2 stages
@pytest.mark.parametrize("world,stages,precision", [(1, 1, ("--bf16",)), (2, 1, ()), (2, 2, ())])
def test_stopped_and_resumed_run_matches_uninterrupted_run(data_dir, tmp_path, world, stages, precision):
    """Dropout on, accumulation 2: 20 steps straight, against 10 steps (--steps_this_run, checkpoint) and a resumed
    run for steps 11-20, bitwise, in one process (bf16 weights, fp32 masters), data-parallel on 2 and 2 stages on
    2. Weights (the masters), LAMB moments and step, the data order, every rank's random generators and the plan
    must all come back; a torn newer checkpoint (ckpt_15.pt) is named and passed over."""
    common = ("--max_steps", "20", "--train_batch_size", "8", "--gradient_accumulation_steps", "2",
              "--partition_num", str(stages), "--num_steps_per_checkpoint", "100", *precision)
    straight = _args(data_dir, tmp_path / "straight", *common, "--skip_checkpoint")
    first = _args(data_dir, tmp_path / "stopped", *common, "--steps_this_run", "10")
    second = _args(data_dir, tmp_path / "stopped", *common, "--resume_from_checkpoint")
    env = {**TWO_MICROBATCHES, "RANNC_PROFILE_CACHE_DIR": str(tmp_path / "profiles")}
    [[straight_run, first_half]] = run_ranks(_pretrain, world, [straight, first], timeout=400, env=env)[:1]
    whole = (tmp_path / "stopped" / "ckpt_10.pt").read_bytes()
    (tmp_path / "stopped" / "ckpt_15.pt").write_bytes(whole[: len(whole) // 2])
    [[second_half]] = run_ranks(_pretrain, world, [second], timeout=400, env=env)[:1]
    assert first_half["global_step"] == 10 and second_half["global_step"] == 20
    assert sorted(p.name for p in (tmp_path / "stopped").glob("ckpt_*")) == ["ckpt_10.pt", "ckpt_15.pt", "ckpt_20.pt"]
    assert first_half["rannc_plan"] == second_half["rannc_plan"] == straight_run["rannc_plan"]
    # the same cuts too: the second deployment plans with the first one's profiles (blocks and optimizer step)
    assert first_half["rannc_pieces"] == second_half["rannc_pieces"] == straight_run["rannc_pieces"]
    reloaded = rannc.Deployment.load(tmp_path / "stopped" / "resumed_deployment.json")   # the resumed run's plan
    assert reloaded.to_json() == torch.load(tmp_path / "stopped" / "ckpt_10.pt", weights_only=True)["deployment"]
    assert first_half["rannc_plan"]["stages"] == stages
    assert first_half["losses"] + second_half["losses"] == straight_run["losses"]  # bitwise


def _crash_on_fifth_save(rank: int, world: int, argv: list[str]) -> None:
    """Run pretraining with a torch.save that, on its fifth call, writes half a file and dies."""
    from bert import pretrain

    real_save, calls = torch.save, []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *args, **kwargs)

    torch.save = flaky_save
    pretrain.main(argv)


def test_bf16_autocast_computes_with_bf16_weights_unless_told_otherwise():
    from bert.pretrain import parse_arguments

    assert parse_arguments(["--bf16"]).bf16_weights
    assert not parse_arguments(["--bf16", "--no-bf16_weights"]).bf16_weights
    assert not parse_arguments([]).bf16_weights and not parse_arguments(["--fp16"]).bf16_weights
    with pytest.raises(SystemExit):
        parse_arguments(["--bf16_weights"])   # bf16 weights without bf16 autocast


def test_crash_while_writing_checkpoint_keeps_previous_ones(data_dir, tmp_path):
    """Checkpoints every 2 steps, the newest 3 kept; the write at step 10 dies half-way. ckpt_4/6/8 must be
    there and whole, with no ckpt_10.pt and no temporary file left."""
    argv = _args(data_dir, tmp_path, "--max_steps", "10", "--train_batch_size", "4", "--num_steps_per_checkpoint",
                 "2", "--no_dropout")
    with pytest.raises(RankError, match="simulated"):
        run_ranks(_crash_on_fifth_save, 1, argv, timeout=200)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == [
        "ckpt_4.pt", "ckpt_6.pt", "ckpt_8.pt"]
    checkpoint = torch.load(tmp_path / "ckpt_8.pt", weights_only=True)
    assert checkpoint["global_step"] == 8
    assert checkpoint["data_loader"]["step_in_epoch"] == 8
    assert set(checkpoint["optimizer"]["state"]) == set(range(len(checkpoint["optimizer"]["state"])))


def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    """The writer alone: a failing torch.save leaves an existing file untouched and no temporary file."""
    path = tmp_path / "ckpt_1.pt"
    save_checkpoint({"global_step": 1}, path)

    def half_write(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("simulated")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"global_step": 2}, path)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"global_step": 2}, tmp_path / "ckpt_2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt"]
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def test_step_values_reach_the_host_in_step_order_with_what_travels_along():
    """The training loop's queue of device values: each step's scalars come back as floats, oldest first, with
    their extra data, once (on the CPU at once; on a GPU once the copy behind the step's work is done)."""
    from bert.step_values import StepValues

    values = StepValues()
    values.put(1, [torch.tensor(2.5), torch.tensor([0.75])], ("epoch 0", 1e-3))
    values.put(2, [torch.tensor(1.5, dtype=torch.float64), torch.tensor([0.5])], ("epoch 0", 2e-3))
    assert len(values) == 2
    assert values.ready() == [(1, [2.5, 0.75], ("epoch 0", 1e-3)), (2, [1.5, 0.5], ("epoch 0", 2e-3))]
    assert len(values) == 0 and values.ready(wait=True) == []
