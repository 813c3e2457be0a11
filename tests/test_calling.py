"""Calling conventions and RaNNC's API around a call: keyword and constant arguments, RaNNC's toggled
accumulation pattern, state left untouched by capture and profiling, BatchNorm's modes, undeploy,
gather_inputs=False, attribute forwarding, and inputs that differ between ranks refused on every rank."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from distributed import RankError, run_ranks

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item() / (b.abs().max().item() + 1e-3)


def _toggled_accumulation(rank, world, name, stages, schedule):
    """RaNNC's pattern: delay on the early micro-steps, no delay on the last one; no allreduce_grads()."""
    import rannc
    torch.manual_seed(0)
    model = models.make(name)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1, schedule=schedule)
    errors = []
    for step in range(2):
        for micro in range(3):
            rannc.delay_grad_allreduce(micro < 2)
            batch = models.global_batch(name, 12, seed=10 * step + micro)
            wrapped(*models.local_part(batch, rank, world)).backward()
            reference(*batch).backward()
        for key, p in reference.named_parameters():
            errors.append((key, _rel(wrapped.get_param_grad(key), p.grad)))
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    rannc.delay_grad_allreduce(False)
    return max(errors, key=lambda e: e[1])


@pytest.mark.parametrize("world,stages,schedule", [(2, 1, "gpipe"), (2, 2, "gpipe"), (3, 2, "gpipe"),
                                                   (2, 2, "1f1b")])
def test_toggled_delay_accumulation_equals_single_process(world, stages, schedule):
    for key, err in run_ranks(_toggled_accumulation, world, "bert", stages, schedule, timeout=300):
        assert err < RTOL, f"gradient of {key} differs by {err:.2e} (world {world}, {stages} stages, {schedule})"


def _keywords_and_constants(rank, world):
    import rannc
    torch.manual_seed(0)
    model = models.make("scaled")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, profile_repeats=1)
    errors = []
    for step in range(3):
        x, y = models.global_batch("scaled", 8, seed=step)
        lx, ly = models.local_part([x, y], rank, world)
        loss = wrapped(lx, y=ly, scale=0.5)
        loss.backward()
        ref_loss = reference(x, y=y, scale=0.5)
        ref_loss.backward()
        errors.append(_rel(loss, ref_loss))
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
    errors += [_rel(wrapped.get_param(n), p) for n, p in reference.named_parameters()]
    return max(errors), wrapped.head.out_features   # attribute read through to the wrapped model


def test_keyword_and_constant_arguments_and_attribute_forwarding():
    for err, out_features in run_ranks(_keywords_and_constants, 2, timeout=200):
        assert err < RTOL
        assert out_features == 1


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def test_capture_and_profiling_leave_state_untouched_and_batchnorm_follows_train_and_eval():
    import rannc
    torch.manual_seed(0)
    model = _BatchNormNet()
    reference = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)   # gradients already there must survive the first call
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    x = torch.randn(8, 6)
    out = wrapped(x)
    assert model.bn.num_batches_tracked.item() == 1   # one training call, whatever capture and profiling ran
    ref_out = reference(x)
    assert _rel(out, ref_out) < RTOL
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_before[n]), n
    for key, value in reference.state_dict().items():
        assert _rel(model.state_dict()[key], value) < RTOL, key
    wrapped.eval()
    reference.eval()
    with torch.no_grad():
        assert _rel(wrapped(x), reference(x)) < RTOL   # running statistics in eval mode
    assert model.bn.num_batches_tracked.item() == 1


def test_a_model_in_eval_mode_before_wrapping_runs_in_eval_mode():
    """model.eval() before RaNNCModule(model): the first call (the capture's, traced in train mode) and the next
    use the running statistics and leave them alone, as the model itself would; train() then trains."""
    import rannc
    torch.manual_seed(0)
    model = _BatchNormNet()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    model.eval()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    assert not wrapped.training
    x = torch.randn(8, 6)
    for _ in range(2):
        assert _rel(wrapped(x), reference(x)) < RTOL
    assert model.bn.num_batches_tracked.item() == 0 and not model.training
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)
    wrapped.train()
    reference.train()
    assert _rel(wrapped(x), reference(x)) < RTOL and model.bn.num_batches_tracked.item() == 1


def test_a_batchnorm_frozen_in_eval_inside_a_training_model_stays_frozen():
    """model.bn.eval() inside a model in train mode (a frozen BatchNorm, as when fine-tuning): the graph keeps it
    on its running statistics, which stay as they were, and the layer's mode stays as the user set it."""
    import rannc
    torch.manual_seed(0)
    model = _BatchNormNet()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    model.bn.eval()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    x = torch.randn(8, 6)
    for _ in range(2):
        assert _rel(wrapped(x), reference(x)) < RTOL
    assert model.training and not model.bn.training and model.bn.num_batches_tracked.item() == 0
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)


class _RecurrentNet(nn.Module):
    """Layers whose mode decides more than dropout masks in plain torch ops: an LSTM dropping out between its
    layers (a flag of its one op), alpha dropout, attention whose dropout rate follows self.training, BatchNorm."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 6, num_layers=2, dropout=0.5, batch_first=True)
        self.bn = nn.BatchNorm1d(6)
        self.alpha = nn.AlphaDropout(0.3)
        self.attention_dropout = 0.2
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        y = self.alpha(self.bn(y.transpose(1, 2)).transpose(1, 2))
        y = F.scaled_dot_product_attention(y, y, y, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.head(y).sum()


def test_recurrent_and_alpha_dropout_follow_eval_mode_and_enable_dropout():
    """With enable_dropout(False) in train mode the LSTM drops nothing between its layers, nor alpha dropout nor
    attention (against the model with those rates at 0), and the LSTM still trains; in eval mode neither drops
    out, as in the model itself (the graph is traced in train mode, where the LSTM's and alpha dropout's ops
    carry train=True). The model reads self.training, so the capture compares both modes' graphs, and finds no
    difference beyond what rannc switches."""
    import rannc
    torch.manual_seed(0)
    model = _RecurrentNet()
    reference = copy.deepcopy(model)
    reference.lstm.dropout, reference.alpha.p, reference.attention_dropout = 0.0, 0.0, 0.0
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    wrapped.enable_dropout(False)
    x = torch.randn(8, 5, 6)
    loss, ref = wrapped(x), reference(x)
    assert wrapped._captured.eval_difference is None
    assert _rel(loss, ref) < RTOL
    loss.backward()
    ref.backward()
    assert _rel(model.lstm.weight_ih_l1.grad, reference.lstm.weight_ih_l1.grad) < RTOL
    wrapped.eval()
    reference.eval()
    with torch.no_grad():
        for _ in range(2):
            assert _rel(wrapped(x), reference(x)) < RTOL


class _StackedLstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 6, num_layers=2, dropout=0.5, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y).sum()


def test_a_recomputing_stage_replays_recurrent_dropout_masks(monkeypatch):
    """A stage that recomputes runs a recurrent layer dropping out between layers without cuDNN, both times:
    cuDNN's RNN draws its masks from a dropout state of its own that the recomputation's restored RNG state does
    not reach (pytorch/pytorch#74177), and its backward would then belong to other masks than the loss. The
    gradients match a stage that keeps its activations, dropout on, cuDNN off there too where there is CUDA
    (on the CPU there is no cuDNN: the switch is counted)."""
    import rannc
    from rannc.graph import dropout as switches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    original = switches._without_cudnn

    def counted(op, args):
        calls.append(switches.switches()[2])   # recomputing or not
        return original(op, args)

    monkeypatch.setattr(switches, "_without_cudnn", counted)
    torch.manual_seed(0)
    model = _StackedLstm().to(device)
    kept = copy.deepcopy(model)
    recomputed = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, recompute="always", compile=False)
    keeping = rannc.RaNNCModule(kept, profile_repeats=1, verbose=False, recompute="never", compile=False)
    x = torch.randn(8, 5, 6, device=device)
    recomputed(x), keeping(x)    # deploy both
    model.zero_grad(), kept.zero_grad()
    calls.clear()
    torch.manual_seed(1)
    recomputed(x).backward()
    assert calls == [False, True]   # the first run and the recomputation, cuDNN off in both
    torch.manual_seed(1)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    keeping(x).backward()
    assert calls == [False, True]
    for p, q in zip(model.parameters(), kept.parameters()):
        assert _rel(p.grad, q.grad) < RTOL


class _DropoutInBlocks(nn.Module):
    """Dropout inside a torch.no_grad() block and inside an autocast block: export traces both apart, as
    subgraphs of higher-order ops, and the switches must reach them there too."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.p = 0.3

    def forward(self, x):
        h = self.lin(x)
        with torch.no_grad():
            scale = F.dropout(h, self.p, self.training)
        with torch.autocast("cpu", enabled=False):
            h = self.drop(h.float())
        return (h * scale).sum()


def test_dropout_inside_no_grad_and_autocast_blocks_follows_the_switches():
    """In eval mode and with enable_dropout(False), the dropouts inside both blocks draw nothing, as the model
    with those rates at 0 (before, eval mode kept both dropping out, and enable_dropout(False) did not reach
    them)."""
    import rannc
    torch.manual_seed(0)
    model = _DropoutInBlocks()
    reference = copy.deepcopy(model)
    reference.p, reference.drop.p = 0.0, 0.0
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    wrapped.enable_dropout(False)
    x = torch.randn(8, 6)
    for _ in range(2):
        assert _rel(wrapped(x), reference(x)) < RTOL
    wrapped.enable_dropout(True)
    assert wrapped._captured.eval_difference is None
    wrapped.eval()
    for _ in range(2):
        assert _rel(wrapped(x), reference(x)) < RTOL


def test_recurrent_dropout_draws_masks_inside_compiled_code():
    """torch's decomposition of the recurrent ops, which compile traces through, never drops out between
    layers; the routed op runs eagerly inside compiled code, so it does (masks differ from call to call and
    from the rate 0)."""
    from rannc.graph import dropout as switches
    torch.manual_seed(0)
    gru = nn.GRU(6, 6, num_layers=2, dropout=0.5)
    x, h = torch.randn(5, 4, 6), torch.zeros(2, 4, 6)
    routed = switches._ROUTES[torch.ops.aten.gru.input]

    def run(p):
        return routed(x, h, list(gru._flat_weights), True, 2, p, True, False, False)[0].sum()

    compiled = torch.compile(run, backend="aot_eager")
    with torch.no_grad():
        first, second, without = compiled(0.5).item(), compiled(0.5).item(), run(0.0).item()
    torch._dynamo.reset()
    assert first != second and without not in (first, second)


class _TrainOnlyTerm(nn.Module):
    """A model whose own code adds a term in train mode only: not something rannc's switches know of."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = y + 1.0
        return y.mean()


def test_eval_calls_are_refused_where_the_forward_branches_on_training_beyond_dropout():
    """The graph holds the train-mode branch; an eval-mode call would run it. Training runs as the model does;
    an eval-mode call raises, naming the operation and the source line, before running anything; a model in
    eval mode when wrapped is refused at its first call the same way."""
    import rannc
    torch.manual_seed(0)
    model = _TrainOnlyTerm()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)
    x = torch.randn(8, 6)
    assert _rel(wrapped(x), reference(x)) < RTOL
    wrapped.eval()
    with pytest.raises(RuntimeError, match=r"(?s)eval mode.*aten\.add\.Tensor.*y = y \+ 1\.0"):
        wrapped(x)
    wrapped.train()
    assert _rel(wrapped(x), reference(x)) < RTOL      # training goes on after the refusal
    in_eval = _TrainOnlyTerm().eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        rannc.RaNNCModule(in_eval, profile_repeats=1, verbose=False, min_pipeline=1, max_pipeline=1)(x)


def _refused_then_trained(rank, world):
    import rannc
    torch.manual_seed(0)
    model = _TrainOnlyTerm()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, partition_num=1)
    x = torch.randn(8, 6)
    rows = x[rank * 4:(rank + 1) * 4]
    errors = [_rel(wrapped(rows), reference(x))]
    wrapped.eval()
    try:
        wrapped(rows)
        refused = None
    except RuntimeError as exc:
        refused = str(exc)
    wrapped.train()
    errors.append(_rel(wrapped(rows), reference(x)))   # the job goes on: nothing was torn down
    rannc.barrier()
    return refused, errors


def test_the_eval_refusal_leaves_every_rank_able_to_train_on():
    """Every rank refuses the eval-mode call together, so none reports a failure that would end the job."""
    for refused, errors in run_ranks(_refused_then_trained, 2, timeout=120):
        assert refused is not None and "eval mode" in refused
        assert max(errors) < RTOL


def _undeploy_and_continue(rank, world):
    import rannc
    torch.manual_seed(0)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, eps=1e-3)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, profile_repeats=1)
    errors = []
    for step in range(4):
        batch = models.global_batch("mlp", 8, seed=step)
        wrapped(*models.local_part(batch, rank, world)).backward()
        reference(*batch).backward()
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        if step == 1:
            wrapped.undeploy()   # every rank holds the whole model again
            errors += [_rel(p, q) for p, q in zip(model.parameters(), reference.parameters())]
            assert all(p.numel() == q.numel() for p, q in zip(model.parameters(), reference.parameters()))
            assert not wrapped.ready
    errors += [_rel(wrapped.get_param(n), q) for n, q in reference.named_parameters()]
    return max(errors)


def test_undeploy_gives_the_whole_model_back_and_training_continues():
    for err in run_ranks(_undeploy_and_continue, 2, timeout=300):
        assert err < RTOL


def _rank_zero_batch(rank, world):
    import rannc
    torch.manual_seed(0)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, gather_inputs=False, partition_num=2, profile_repeats=1)
    x, y = models.global_batch("mlp", 6, seed=0)
    mine = [x, y] if rank == 0 else [torch.randn_like(x), torch.randn_like(y)]   # ignored on other ranks
    loss = wrapped(*mine)
    loss.backward()
    ref_loss = reference(x, y)
    ref_loss.backward()
    grads = [_rel(wrapped.get_param_grad(n), p.grad) for n, p in reference.named_parameters()]
    return _rel(loss, ref_loss), max(grads)


def test_gather_inputs_false_trains_on_rank_zero_batch():
    for loss_err, grad_err in run_ranks(_rank_zero_batch, 2, timeout=200):
        assert loss_err < RTOL and grad_err < RTOL


def _different_call_on_one_rank(rank, world, kind):
    import rannc
    torch.manual_seed(0)
    model = models.make("scaled")
    wrapped = rannc.RaNNCModule(model, profile_repeats=1)
    x, y = models.local_part(models.global_batch("scaled", 8, 0), rank, world)
    if kind == "keyword" and rank == 1:
        return wrapped(x, y, scale=2.0)
    if kind == "dtype" and rank == 1:
        return wrapped(x.double(), y, 2.0)
    if kind == "object" and rank == 1:
        return wrapped(x, y, scale=object())
    return wrapped(x, y, 2.0)


@pytest.mark.parametrize("kind,message", [
    ("keyword", "rank 0 calls the model with (#0, #1, #2=2.0) but rank 1 with (#0, #1, scale=2.0)"),
    ("dtype", "argument #0 has dtype torch.float32 on rank 0 but torch.float64 on rank 1"),
    ("object", "argument scale is a object"),
])
def test_a_call_refused_on_one_rank_is_refused_on_every_rank_at_once(kind, message):
    started = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_different_call_on_one_rank, 2, kind, timeout=120, env={"RANNC_COMM_TIMEOUT_S": "300"})
    assert time.monotonic() - started < 60   # not the 300 s timeout
    errors = info.value.errors
    assert sorted(errors) == [0, 1]
    assert all(message in e for e in errors.values()), errors


class _TwoHeads(nn.Module):
    """Returns a dict of a batched output and a scalar, with None in between."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        logits = self.head(torch.tanh(self.body(x)))
        return {"logits": logits, "aux": None, "loss": F.cross_entropy(logits, y)}


def _structured_outputs(rank, world, schedule):
    import rannc
    torch.manual_seed(0)
    model = _TwoHeads()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, partition_num=2, profile_repeats=1, schedule=schedule)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    rows = slice(rank * 12 // world, (rank + 1) * 12 // world)
    out = wrapped(x[rows], y[rows])
    ref = reference(x, y)
    assert out["aux"] is None and out["logits"].shape == (12 // world, 3)
    out["loss"].backward()   # the scalar: the global-batch loss, the single-process gradient
    ref["loss"].backward()
    errs = [_rel(out["loss"], ref["loss"]), _rel(out["logits"], ref["logits"][rows])]
    errs += [_rel(wrapped.get_param_grad(n), p.grad) for n, p in reference.named_parameters()]
    return max(errs)


def test_structured_outputs_with_a_scalar_loss_inside():
    """GPipe (schedules running backwards inside the call refuse such a model: tests/test_bad_input.py)."""
    assert max(run_ranks(_structured_outputs, 2, "gpipe", timeout=200)) < RTOL


class _RunningAverage(nn.Module):
    """A running average of the batch's features kept by the model itself, updated under no_grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("average", torch.zeros(4))

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            self.average.mul_(0.9).add_(0.1 * h.mean(0))
        return h.pow(2).mean()


def _running_average(rank, world):
    import rannc
    torch.manual_seed(0)
    model = _RunningAverage()
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, profile_repeats=1, partition_num=1, min_pipeline=1, max_pipeline=1)
    for step in range(2):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        wrapped(x.chunk(world)[rank]).backward()
        reference(x).backward()
    return model.average.clone(), reference.average


def test_a_buffer_written_under_no_grad_is_averaged_over_replicas():
    """Two replicas each average their 4 rows into the model's own buffer inside a no_grad block: averaged after
    every training call, every rank holds the single process's value over the 8 rows (each kept its own
    before rannc looked inside such blocks for writes)."""
    (a0, expected), (a1, _) = run_ranks(_running_average, 2, timeout=120)
    assert torch.equal(a0, a1)
    torch.testing.assert_close(a0, expected, rtol=1e-6, atol=1e-7)
