"""param_dtype='bfloat16': the model computes with bfloat16 parameters, the optimizer steps fp32 masters.

Against the plain model trained the same way by hand (its parameters cast to bfloat16, fp32 masters in an SGD
over them, gradients copied in before each step and the masters copied out after it): at one process, one
micro-batch per stage, the same operations, so equal; with replicas or micro-batches the bfloat16 gradients of
parts of the batch are summed, so equal to their rounding. Also: state dicts, get_param and the optimizer's state
hold fp32 masters, a checkpoint resumes exactly, undeploy gives fp32 parameters back, and a failed first call
restores them.

Under autocast, fp32 weights compute exactly what bfloat16 weights do (each weight is cast before use, its
gradient cast back), so the by-hand reference is also plain autocast training with fp32 weights."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from distributed import run_ranks

STEPS = 4
BATCH = 16


class HandMixedPrecision:
    """The plain model in bfloat16 with fp32 masters, stepped by hand."""

    def __init__(self, model: torch.nn.Module, make_optimizer):
        self.model = model
        self.pairs = [(p, torch.nn.Parameter(p.detach().clone())) for p in model.parameters()]
        for p, _ in self.pairs:
            p.data = p.data.to(torch.bfloat16)
        self.optimizer = make_optimizer([m for _, m in self.pairs])

    def step(self) -> None:
        for p, m in self.pairs:
            m.grad = p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)
                p.grad = None

    def masters(self) -> dict[str, torch.Tensor]:
        return {n: m for (n, _), (_, m) in zip(self.model.named_parameters(), self.pairs)}


def _sgd(params):
    """SGD: a step proportional to the gradient, so bfloat16 rounding of gradients stays as small in the
    weights (Adam's normalised step turns the rounding of near-zero gradients into full-size steps)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _lamb(params):
    """bert.optim.Lamb, which takes rannc's compute copies itself (reads their grads, writes them)."""
    from bert.optim import Lamb
    return Lamb(params, lr=0.01, weight_decay=0.01, max_grad_norm=0)


def _train(rank, world, name, items, optimizer_kind="sgd"):
    import rannc

    make_optimizer = {"sgd": _sgd, "lamb": _lamb}[optimizer_kind]
    torch.manual_seed(7)
    model = models.make(name)
    reference = HandMixedPrecision(copy.deepcopy(model), make_optimizer)
    optimizer = make_optimizer(model.parameters())
    wrapped = rannc.RaNNCModule(model, optimizer, param_dtype="bfloat16", profile_repeats=1, **items)
    loss_err = 0.0
    for step in range(STEPS):
        batch = models.global_batch(name, BATCH, seed=step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(*models.local_part(batch, rank, world))
            ref_loss = reference.model(*batch)
        loss.backward()
        ref_loss.backward()
        loss_err = max(loss_err, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        wrapped.clip_grad_norm(1e9)   # the norm over bfloat16 gradients; nothing clipped
        optimizer.step()
        optimizer.zero_grad()   # clears the bf16 parameters' gradients too (the optimizer holds the masters)
        reference.step()
    state = wrapped.state_dict(sync_all_ranks=True)
    masters = reference.masters()
    param_err = max((relative(state[n], m.detach()) for n, m in masters.items()), default=0.0)
    dtypes = {str(v.dtype) for v in state.values()}
    local = [p for p in wrapped.parameters()]
    computes_in_bf16 = all(p.dtype == torch.bfloat16 for p in local)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer_in_fp32 = all(p.dtype == torch.float32 for p in stepped) and len(stepped) == len(local)
    name0 = next(iter(masters))
    master_value = wrapped.get_param(name0, amp_master_param=True)
    compute_value = wrapped.get_param(name0)
    opt_state = optimizer.state_dict()
    moments_fp32 = all(t.dtype == torch.float32 for s in opt_state["state"].values() for t in s.values()
                       if torch.is_tensor(t) and t.dim() > 0)
    return (loss_err, param_err, dtypes, computes_in_bf16, optimizer_in_fp32, master_value.dtype,
            torch.equal(master_value.to(torch.bfloat16), compute_value), moments_fp32,
            wrapped.deployment.table())


# One micro-batch per stage and no replicas: the reference's operations exactly. Replicas or several
# micro-batches sum bfloat16 gradients of parts of the batch: rounding of each part (with fp32 weights under
# autocast the same plans differ from the reference by as much: 2% of the largest gradient at the first step).
@pytest.mark.parametrize("world,name,items,loss_tol,param_tol,optimizer_kind", [
    (1, "mlp", {}, 1e-6, 1e-6, "sgd"),
    (1, "bert", {}, 1e-6, 1e-6, "lamb"),
    (2, "bert", {"partition_num": 2}, 1e-6, 1e-6, "sgd"),
    # gate and up fused, their gradients pieces of one bf16 gradient: the one wider bf16 product rounds a few
    # outputs the other way (4.5e-5 in the loss, 0.9% of the largest weight after 4 LAMB steps; 0 unfused)
    (2, "gated", {"partition_num": 2}, 1e-3, 5e-2, "lamb"),
    (2, "mlp", {"partition_num": 1}, 1e-3, 5e-2, "sgd"),
    (2, "mlp", {"partition_num": 2, "min_pipeline": 4}, 1e-3, 5e-2, "sgd"),
])
def test_bf16_parameters_with_fp32_masters_train_as_by_hand(world, name, items, loss_tol, param_tol,
                                                             optimizer_kind):
    for result in run_ranks(_train, world, name, items, optimizer_kind, timeout=300):
        loss_err, param_err, dtypes, in_bf16, opt_fp32, master_dtype, master_rounds_to_compute, moments, table = result
        assert loss_err < loss_tol, table
        assert param_err < param_tol, table
        assert dtypes == {"torch.float32"}           # the state dict holds the fp32 masters
        assert in_bf16 and opt_fp32 and moments
        assert master_dtype == torch.float32 and master_rounds_to_compute


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / (b.abs().max().item() + 1e-3)


def _resume_and_undeploy(rank, world):
    """Train 2 steps, checkpoint, train 2 more; a fresh module loading the checkpoint trains the same 2. (The
    state dict kept in memory must not alias the live parameters, as gloo's CPU tensors once did; the fresh
    module's first call runs under no_grad, which once failed in the profiler's backward.)"""
    import rannc

    def make():
        torch.manual_seed(3)
        model = models.make("mlp")
        optimizer = _sgd(model.parameters())
        return model, optimizer, rannc.RaNNCModule(model, optimizer, param_dtype="bfloat16", partition_num=2,
                                                   profile_repeats=1)

    def steps(wrapped, optimizer, seeds):
        for seed in seeds:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = wrapped(*models.local_part(models.global_batch("mlp", BATCH, seed), rank, world))
            loss.backward()
            optimizer.step()
            wrapped.zero_grad()

    model, optimizer, wrapped = make()
    steps(wrapped, optimizer, [0, 1])
    saved = (wrapped.state_dict(sync_all_ranks=True), optimizer.state_dict())
    steps(wrapped, optimizer, [2, 3])
    straight = wrapped.state_dict(sync_all_ranks=True)
    wrapped.undeploy()
    back_in_fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    undeployed_equal = all(torch.equal(straight[n], p.detach()) for n, p in model.named_parameters())

    _, optimizer2, wrapped2 = make()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # deploy, then load, as a resumed run does
        wrapped2(*models.local_part(models.global_batch("mlp", BATCH, 0), rank, world))
    wrapped2.zero_grad()
    wrapped2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    steps(wrapped2, optimizer2, [2, 3])
    resumed = wrapped2.state_dict(sync_all_ranks=True)
    return (max(relative(resumed[k], v) for k, v in straight.items()), back_in_fp32, undeployed_equal)


def test_checkpoint_resumes_exactly_and_undeploy_gives_fp32_back():
    for err, back_in_fp32, undeployed_equal in run_ranks(_resume_and_undeploy, 2, timeout=300):
        assert err == 0.0
        assert back_in_fp32 and undeployed_equal


def test_param_dtype_needs_the_optimizer_and_a_failed_first_call_restores_fp32():
    import rannc

    with pytest.raises(ValueError, match="needs the optimizer"):
        rannc.RaNNCModule(models.make("mlp"), param_dtype="bfloat16")
    with pytest.raises(rannc.ConfigError, match="param_dtype"):
        rannc.RaNNCModule(models.make("mlp"), torch.optim.SGD(models.make("mlp").parameters(), lr=0.1),
                          param_dtype="float16")
    model = models.make("mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), param_dtype="bfloat16",
                                partition_num=9)   # more stages than processes: planning fails
    with pytest.raises(rannc.PlanningError, match="partition_num=9"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wrapped(*models.global_batch("mlp", BATCH, 0))
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


CURVE_STEPS = 100
CURVE_CONFIG = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 32, "type_vocab_size": 2}


def _copy_task(step: int, batch: int = 16, seq: int = 16, preds: int = 4):
    """BERT's inputs for a task a tiny model learns within a few hundred steps: name the token shown at each
    scored position."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, CURVE_CONFIG["vocab_size"], (batch, seq), generator=g)
    positions = torch.stack([torch.randperm(seq - 1, generator=g)[:preds] + 1 for _ in range(batch)]).sort(1).values
    segments = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    return (ids, segments, torch.ones(batch, seq, dtype=torch.long), positions, ids.gather(1, positions),
            torch.randint(0, 2, (batch,), generator=g))


def _curves(rank, world):
    """The BERT application's training (LAMB, clipping, bf16 autocast, dropout on) of a tiny BERT: under rannc
    with fp32 weights and with bf16 weights and fp32 masters, on the same dropout seed; and the plain model with
    fp32 weights on two other dropout seeds (the noise a curve has anyway)."""
    import rannc
    from bert.modeling import BertConfig, BertForPreTrainingWithCriterion
    from bert.optim import Lamb, bert_param_groups

    curves = {}
    for name, items, seed in [("fp32", {}, 0), ("bf16", {"param_dtype": "bfloat16"}, 0), ("fp32 seed 1", None, 1),
                              ("fp32 seed 2", None, 2)]:
        torch.manual_seed(0)
        model = BertForPreTrainingWithCriterion(BertConfig(**CURVE_CONFIG))
        optimizer = Lamb(bert_param_groups(model), lr=2e-2, max_grad_norm=0)
        wrapped = model if items is None else rannc.RaNNCModule(model, optimizer, profile_repeats=1, **items)
        torch.manual_seed(seed)
        curve = []
        for step in range(CURVE_STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = wrapped(*_copy_task(step))
            loss.backward()
            if items is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                wrapped.clip_grad_norm(1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[name] = curve
        if items is not None:
            curves[f"{name} dtypes"] = sorted({str(p.dtype) for p in wrapped.parameters()})
            wrapped.undeploy()
    return curves


def _distance(a: list[float], b: list[float], window: int = 15) -> float:
    """Mean absolute difference of two curves' moving averages."""
    def smooth(xs):
        return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]
    return sum(abs(x - y) for x, y in zip(smooth(a), smooth(b))) / len(a)


def test_bf16_weights_train_within_the_noise_of_fp32_weights():
    """What the BERT application's default (bf16 weights under --bf16) rests on: over the hundred steps in which
    the tiny model learns its task, the bf16-weight curve stays as close to the fp32 one as fp32 curves with
    other dropout masks are."""
    (curves,) = run_ranks(_curves, 1, timeout=300)
    assert curves["bf16 dtypes"] == ["torch.bfloat16"] and curves["fp32 dtypes"] == ["torch.float32"]
    start, tail = curves["fp32"][0], sum(curves["fp32"][-20:]) / 20
    assert tail < 0.5 * start, f"the task was not learnt ({start:.3f} -> {tail:.3f}): the comparison says nothing"
    noise = max(_distance(curves["fp32"], curves[k]) for k in ("fp32 seed 1", "fp32 seed 2"))
    bf16 = _distance(curves["fp32"], curves["bf16"])
    assert 0 < bf16 <= 1.5 * noise, f"bf16 weights' curve {bf16:.4f} from fp32's, fp32 seeds {noise:.4f} apart"
