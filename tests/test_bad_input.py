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


class _LossAndLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))

    def forward(self, x, y):
        logits = self.body(x)
        return torch.nn.functional.mse_loss(logits.sum(1), y), logits


def _pipeline_schedule_for_two_outputs(rank, world):
    import rannc
    x, y = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    torch.manual_seed(0)
    model = _LossAndLogits()
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule="1f1b",
                                partition_num=2, profile_repeats=1)
    wrapped(x, y)[0].backward()


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


def test_a_schedule_running_backwards_in_the_call_is_refused_for_a_model_with_two_outputs():
    errors = _errors(_pipeline_schedule_for_two_outputs, 2)
    assert sorted(errors) == [0, 1]
    assert all("schedule '1f1b' runs backwards inside the call and needs a model returning one scalar loss; "
               "this model returns 2 outputs" in e for e in errors.values()), errors
    # right after the capture: neither profiled nor planned (the traceback names no later step)
    assert not any(step in e for e in errors.values() for step in ("in _make_plan", "in profile", "in _install\n"))


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


class _BatchBranch(torch.nn.Module):
    """Takes another path for batches of more than `over` rows (or fewer than `under`): a graph traced at 8 rows
    holds only for the sizes that take the same path."""

    def __init__(self, over: int | None = None, under: int | None = None):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.over, self.under = over, under

    def forward(self, x):
        h = self.fc(x)
        if (self.over is not None and x.shape[0] > self.over) or (self.under is not None and x.shape[0] < self.under):
            h = h * 2
        return h.pow(2).mean()


def _batch_branch_plan(rank, world, branch, items):
    import rannc
    torch.manual_seed(0)
    model = _BatchBranch(**branch)
    halves = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)).chunk(world)
    with torch.no_grad():  # each rank's forward on its own 8 rows, as under DDP
        eager = sum(float(model(h)) for h in halves) / world
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, **items)
    loss = wrapped(halves[rank])
    d = wrapped.deployment
    return d.microbatch_count, len(d.stages), float(loss), eager


def test_a_branch_on_the_batch_size_keeps_micro_batches_in_its_range():
    """Traced at 8 rows per rank, the branch `x.shape[0] < 10` holds for up to 9 rows: 2 stages on 2 ranks may
    not run the 16 rows of the global batch as one micro-batch (it would take the other path silently), only
    as 2 of 8; the loss is that of each rank's eager forward on its 8 rows."""
    results = run_ranks(_batch_branch_plan, 2, {"under": 10},
                        {"partition_num": 2, "min_pipeline": 1, "max_pipeline": 2}, timeout=120)
    for microbatches, stages, loss, eager in results:
        assert (microbatches, stages) == (2, 2)
        assert loss == pytest.approx(eager, rel=1e-6)


def test_planner_space_keeps_to_the_batch_range():
    from rannc.config import RannConfig
    from rannc.plan.planner import space

    config = RannConfig(min_pipeline=1, max_pipeline=8)
    assert set(space(config, 2, 4, 16)) == {(2, 1), (2, 2), (2, 4), (2, 8), (1, 1), (1, 2), (1, 4), (1, 8)}
    assert set(space(config, 2, 4, 16, (7, None))) == {(2, 1), (1, 1), (1, 2)}   # 16 / (r x m) >= 7
    assert set(space(config, 2, 4, 16, (1, 9))) == {(2, 1), (2, 2), (2, 4), (2, 8), (1, 2), (1, 4), (1, 8)}


def test_a_branch_on_the_batch_size_outside_every_plan_is_a_planning_error():
    errors = _errors_with(_batch_branch_plan, 2, {"over": 6}, {"partition_num": 1, "min_pipeline": 4})
    assert sorted(errors) == [0, 1]
    for text in errors.values():
        assert "branches on its batch size" in text and "7 to any number of rows" in text


class _LenMean(torch.nn.Module):
    """A per-sample mean loss written with len(x) (as CLIP's contrastive loss builds its labels), or with
    x.shape[0], which stays symbolic."""

    def __init__(self, by_len: bool = True):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.by_len = by_len

    def forward(self, x):
        total = self.fc(x).pow(2).sum()
        return total / len(x) if self.by_len else total / x.shape[0]


def test_a_batch_size_fixed_by_len_is_named_and_kept(caplog):
    """len(x) makes export record the batch size as a number: the graph holds for that size only, with a
    warning that names the inputs and the way out; x.shape[0] keeps it free, and a batch of 1 row is fixed too."""
    from rannc.graph.capture import capture

    x = torch.randn(4, 4)
    with caplog.at_level("WARNING", logger="rannc.capture"):
        fixed = capture(_LenMean(), (x,))
    assert (fixed.batch_fixed, fixed.batch_range) == (True, (4, 4))
    assert "fixed the batch size at 4 rows" in caplog.text and "len(x)" in caplog.text
    caplog.clear()
    free = capture(_LenMean(by_len=False), (x,))
    assert (free.batch_fixed, free.batch_range) == (False, (1, None))
    assert not [r for r in caplog.records if r.name == "rannc.capture"]
    with caplog.at_level("WARNING", logger="rannc.capture"):
        one = capture(_LenMean(by_len=False), (x[:1],))
    assert (one.batch_fixed, one.batch_range) == (True, (1, 1)) and "1 row per process" in caplog.text
    towers = capture(_TwoTowers(), (x, torch.randn(4, 4)))   # one input's batch fixed, the other's free
    assert towers.batch_fixed and towers.outputs.kinds == ["batched", "batched"]


class _TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, y):
        return self.fc(x) / len(x), self.fc(y)


class _Contrastive(torch.nn.Module):
    """CLIP's loss in miniature: every sample's embedding against every other's, the batch x batch logits."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, y):
        logits = self.fc(x) @ self.fc(y).t()
        return torch.nn.functional.cross_entropy(logits, torch.arange(x.shape[0]))


def _capture_warnings(rank, world):
    """The warnings of one capture on this rank (every rank traces the same forward)."""
    import logging

    from rannc import dist as rdist
    from rannc.graph.capture import capture

    rdist.init(60)   # as RaNNCModule does before it captures

    class Keep(logging.Handler):
        messages: list = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep(logging.WARNING)
    logging.getLogger("rannc.capture").addHandler(keep)
    capture(_LenMean(), (torch.randn(4, 4),))
    return keep.messages


def test_capture_warnings_come_from_rank_0_only():
    """A warning about the traced forward is the same on every rank, so only rank 0 gives it."""
    first, second = run_ranks(_capture_warnings, 2, timeout=120)
    assert len(first) == 1 and "fixed the batch size" in first[0] and second == []


def test_a_loss_pairing_the_samples_of_the_batch_is_named(caplog):
    """Batch x batch similarities are computed within each micro-batch: a warning names the value and the
    line; a transformer's attention (the batch once in its scores' shape) gets none."""
    from rannc.graph.capture import capture

    with caplog.at_level("WARNING", logger="rannc.capture"):
        capture(_Contrastive(), (torch.randn(4, 4), torch.randn(4, 4)))
    [record] = [r for r in caplog.records if r.name == "rannc.capture"]
    assert "pairs the samples of its batch" in record.getMessage() and "self.fc(y).t()" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="rannc.capture"):
        capture(models.make("bert"), tuple(models.global_batch("bert", 4, 0)))
    assert not [r for r in caplog.records if r.name == "rannc.capture"]


class _Checkpointed(torch.nn.Module):
    """A layer under torch.utils.checkpoint, or under torch.no_grad() (`reentrant=None`)."""

    def __init__(self, reentrant: bool | None, early_output: bool = False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        self.reentrant, self.early_output = reentrant, early_output

    def forward(self, x):
        if self.reentrant is None:
            with torch.no_grad():
                target = self.a(x).sum(-1, keepdim=True)   # a target computed without gradients: legitimate
            return (self.b(x) - target).pow(2).mean()
        h = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        loss = self.b(torch.relu(h)).pow(2).mean()
        return (loss, self.b(x)) if self.early_output else loss   # an output from before the checkpoint


def test_a_reentrant_checkpoint_that_would_train_nothing_is_refused():
    """torch.export traces a reentrant checkpoint, and all after it, with gradients off: backward would leave
    the gradients of the layers in and after it empty, silently, also where another output comes from before
    it. The capture refuses it naming the way out; use_reentrant=False, a part computed under no_grad, and
    parameters that do not train pass."""
    from rannc.graph.capture import CaptureError, capture

    x = torch.randn(4, 4)
    for early_output in (False, True):
        with pytest.raises(CaptureError, match="use_reentrant=False"):
            capture(_Checkpointed(reentrant=True, early_output=early_output), (x,))
    capture(_Checkpointed(reentrant=False), (x,))
    capture(_Checkpointed(reentrant=None), (x,))
    frozen = _Checkpointed(reentrant=True).requires_grad_(False)
    capture(frozen, (x,))


def _len_mean_plan(rank, world, items):
    import rannc
    torch.manual_seed(0)
    model = _LenMean()
    single = _LenMean()
    single.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, **items)
    loss = wrapped(x.chunk(world)[rank])
    loss.backward()
    expected = single(x)
    expected.backward()
    grad_error = max(float((wrapped.get_param_grad(name) - p.grad).abs().max())
                     for name, p in single.named_parameters())
    d = wrapped.deployment
    return (len(d.stages), d.replicas, d.microbatch_count), float(loss), float(expected), grad_error


@pytest.mark.parametrize("items,plan", [({"partition_num": 2, "max_pipeline": 4}, (2, 1, 2)),
                                        ({"partition_num": 1, "max_pipeline": 4}, (1, 2, 1))])
def test_a_batch_size_fixed_by_len_keeps_every_micro_batch_at_it(items, plan):
    """Captured at 4 rows per rank, `sum / len(x)` divides by 4 in every micro-batch: the plan may only run
    micro-batches of 4 rows (2 of them through 2 stages, or one per replica), and then the loss and the gradients
    are the single process's on the 8 rows. Micro-batches of 2 rows halved the loss, silently."""
    for got_plan, loss, expected, grad_error in run_ranks(_len_mean_plan, 2, items, timeout=120):
        assert got_plan == plan
        assert loss == pytest.approx(expected, rel=1e-6) and grad_error < 1e-6


def test_a_batch_size_fixed_by_len_outside_every_plan_is_a_planning_error():
    errors = _errors_with(_len_mean_plan, 2, {"partition_num": 1, "min_pipeline": 2})
    assert sorted(errors) == [0, 1]
    for text in errors.values():
        assert "holds for 4 to 4 rows only" in text and "fixed it" in text


def _errors_with(fn, world, *args):
    with pytest.raises(RankError) as info:
        run_ranks(fn, world, *args, timeout=120)
    return info.value.errors


class _SparseEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, sparse=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.embed(ids)).pow(2).mean()


def test_sparse_gradients_are_refused_before_any_work():
    """An embedding with sparse=True gives sparse gradients, which rannc's all-reduce and clipping do not take:
    refused at the first call, naming the module (under data parallelism it failed in the all-reduce with
    'unsupported memory format option Contiguous')."""
    wrapped = rannc.RaNNCModule(_SparseEmbedding(), profile_repeats=1)
    with pytest.raises(ValueError, match=r"embed is an embedding with sparse=True.*sparse=False"):
        wrapped(torch.randint(0, 10, (4, 3)))
