"""Bad input gets a clear error on every rank, before any work is lost, and never a hang."""

from __future__ import annotations

import pytest
import torch

import rannc

import models
from distributed import RankError, run_ranks


def _wrapped(**items):
    import rannc
    torch.manual_seed(0)
    model = models.make("mlp")
    return rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), profile_repeats=1, **items)


def _call_with_changed_constant(rank, world):
    x, y = models.local_part(models.global_batch("scaled", 8, 0), rank, world)
    torch.manual_seed(0)
    wrapped = rannc.RaNNCModule(models.make("scaled"), profile_repeats=1)
    wrapped(x, y, scale=2.0).backward()
    wrapped(x, y, scale=3.0)


def _call_with_object_argument(rank, world):
    x, _ = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    _wrapped()(x, object())


class _UnbatchedOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).sum(0)  # shape (4,): neither a scalar nor batched


def _return_unbatched_output(rank, world):
    import rannc
    rannc.RaNNCModule(_UnbatchedOutput(), partition_num=2, profile_repeats=1)(torch.randn(4, 4))


def _call_with_uneven_batches(rank, world):
    x, y = models.global_batch("mlp", 8 + rank, 0)
    _wrapped()(x, y)


def _errors(fn, world):
    with pytest.raises(RankError) as info:
        run_ranks(fn, world, timeout=120)
    return info.value.errors


def test_changed_non_tensor_argument_is_refused_on_every_rank():
    errors = _errors(_call_with_changed_constant, 2)
    assert sorted(errors) == [0, 1]
    assert all("argument scale was 2.0 when the model was captured and is 3.0 now" in e for e in errors.values())


def test_argument_of_unsupported_type_is_refused_on_every_rank():
    errors = _errors(_call_with_object_argument, 2)
    assert sorted(errors) == [0, 1]
    assert all("argument #1 is a object" in e for e in errors.values())


def test_output_neither_scalar_nor_batched_is_refused_at_capture_on_every_rank():
    errors = _errors(_return_unbatched_output, 2)
    assert sorted(errors) == [0, 1]
    assert all("output (the whole value) has shape (4,)" in e and "Profil" not in e for e in errors.values())


def test_different_local_batch_sizes_fail_on_every_rank():
    errors = _errors(_call_with_uneven_batches, 2)
    assert sorted(errors) == [0, 1]
    assert all("local batch sizes differ" in e for e in errors.values())


def _save_then_load_other_model(rank, world, path):
    import rannc
    x, y = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    _wrapped(save_deployment=True, deployment_file=path)(x, y).backward()
    rannc.barrier()
    torch.manual_seed(0)
    other = models.make("skip")
    wrapped = rannc.RaNNCModule(other, load_deployment=True, deployment_file=path, profile_repeats=1)
    xs, target = models.local_part(models.global_batch("skip", 8, 0), rank, world)
    wrapped(xs, target)


def test_deployment_of_another_model_is_refused_on_every_rank(tmp_path):
    path = str(tmp_path / "deployment.json")
    with pytest.raises(RankError) as info:
        run_ranks(_save_then_load_other_model, 2, path, timeout=120)
    errors = info.value.errors
    assert sorted(errors) == [0, 1]
    assert all("planned for another model" in e for e in errors.values())


def _load_for_other_batch(rank, world, path):
    x, y = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    _wrapped(save_deployment=True, deployment_file=path)(x, y)
    import rannc
    rannc.barrier()
    x, y = models.local_part(models.global_batch("mlp", 12, 0), rank, world)
    _wrapped(load_deployment=True, deployment_file=path)(x, y)


def test_deployment_for_another_batch_size_is_refused(tmp_path):
    with pytest.raises(RankError) as info:
        run_ranks(_load_for_other_batch, 2, str(tmp_path / "d.json"), timeout=120)
    assert all("global batch size 8, this run has 12" in e for e in info.value.errors.values())


def _unknown_item(rank, world):
    _wrapped(partition_nmu=2)


def test_unknown_config_item_names_the_closest_one():
    errors = _errors(_unknown_item, 2)
    assert sorted(errors) == [0, 1]
    assert all("unknown rannc config item 'partition_nmu'" in e and "partition_num" in e
               for e in errors.values())


def _rank_raises_inside_training(rank, world):
    x, y = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    wrapped = _wrapped(partition_num=2)
    wrapped(x, y).backward()
    if rank == 1:
        raise RuntimeError("simulated failure on rank 1")
    wrapped(x, y).backward()  # rank 0 waits for rank 1 here: the timeout must end it


def test_a_failing_rank_does_not_hang_the_others():
    with pytest.raises(RankError) as info:
        run_ranks(_rank_raises_inside_training, 2, timeout=200, env={"RANNC_COMM_TIMEOUT_S": "10"})
    errors = info.value.errors
    assert "simulated failure on rank 1" in errors[1]
    assert 0 in errors  # rank 0 ends with an error of its own (timeout or peer gone), not a hang
