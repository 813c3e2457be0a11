"""RaNNC's own call forms, as its example scripts and test launcher use them, on 2 gloo ranks: the patched
optimizer's state_dict/load_state_dict(from_global=True), the module-level allreduce_grads(model, optimizer,
prescale) after accumulation under delay_grad_allreduce(True), and RANNC_SHOW_CONFIG_ITEMS=true (plus
RaNNC-only items) in the environment."""

from __future__ import annotations

import copy
import io

import torch

import models
from distributed import run_ranks

BATCH = 8
RTOL, ATOL = 1e-5, 1e-6


def _adam(params):
    return torch.optim.Adam(params, lr=0.01, eps=1e-3)


def _step(wrapped, optimizer, rank, world, step):
    loss = wrapped(*models.local_part(models.global_batch("mlp", BATCH, seed=step), rank, world))
    loss.backward()
    return loss.item()


def _resume(rank, world, model_state, optimizer_state, stages, load_before_deploy):
    """A fresh model and optimizer (another init) resume from the saved state for steps 2 and 3."""
    import pyrannc
    torch.manual_seed(99)
    model = models.make("mlp")
    optimizer = _adam(model.parameters())
    wrapped = pyrannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1)
    wrapped.load_state_dict(model_state)
    if load_before_deploy:
        optimizer.load_state_dict(optimizer_state, from_global=True)
    losses = []
    for step in (2, 3):
        losses.append(_step(wrapped, optimizer, rank, world, step))
        if not load_before_deploy and step == 2:  # the examples' pattern: once the partition is known
            optimizer.load_state_dict(optimizer_state, from_global=True)
        optimizer.step()
        optimizer.zero_grad()
    return losses, wrapped.state_dict(sync_all_ranks=True)


def _save_and_resume(rank, world):
    import pyrannc
    torch.manual_seed(7)
    model = models.make("mlp")
    optimizer = _adam(model.parameters())
    wrapped = pyrannc.RaNNCModule(model, optimizer, partition_num=2, profile_repeats=1)
    for step in (0, 1):
        _step(wrapped, optimizer, rank, world, step)
        optimizer.step()
        optimizer.zero_grad()
    global_state = optimizer.state_dict(from_global=True)
    default_state = optimizer.state_dict()  # from_global=False: global here too (see OptimizerPatch)
    buf = io.BytesIO()
    torch.save({"model": wrapped.state_dict(sync_all_ranks=True, no_hook=True), "optimizer": global_state}, buf)

    def load():  # a fresh copy each time: a loaded optimizer's state tensors alias the dict's, as in torch
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        return saved["model"], saved["optimizer"]

    # another plan (2 replicas of 1 stage) loaded before deployment; the same plan loaded after it
    before = _resume(rank, world, *load(), stages=1, load_before_deploy=True)
    after = _resume(rank, world, *load(), stages=2, load_before_deploy=False)
    return global_state, default_state, before, after


def _reference():
    torch.manual_seed(7)
    model = models.make("mlp")
    optimizer = _adam(model.parameters())
    losses, saved = [], None
    for step in range(4):
        loss = model(*models.global_batch("mlp", BATCH, seed=step))
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            saved = copy.deepcopy(optimizer.state_dict())
    return losses, saved, copy.deepcopy(model.state_dict())


def _assert_same_optimizer_state(got, want, what):
    assert got["param_groups"] == want["param_groups"], what
    assert sorted(got["state"]) == sorted(want["state"]), what
    for index, entry in want["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(torch.as_tensor(got["state"][index][key]), torch.as_tensor(value),
                                       rtol=RTOL, atol=ATOL, msg=f"{what}: state[{index}][{key}]")


def test_optimizer_state_dict_from_global_round_trip():
    results = run_ranks(_save_and_resume, 2, timeout=300)
    ref_losses, ref_optimizer_state, ref_params = _reference()
    for rank, (global_state, default_state, *resumed) in enumerate(results):
        _assert_same_optimizer_state(global_state, ref_optimizer_state, f"rank {rank} from_global=True")
        _assert_same_optimizer_state(default_state, ref_optimizer_state, f"rank {rank} from_global=False")
        for how, (losses, params) in zip(("before deployment", "after deployment"), resumed):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[2:]), rtol=RTOL, atol=ATOL,
                                       msg=f"rank {rank}, loaded {how}: losses")
            for key, value in ref_params.items():
                torch.testing.assert_close(params[key], value, rtol=RTOL, atol=ATOL,
                                           msg=f"rank {rank}, loaded {how}: {key}")


ACCUMULATION = 3


def _accumulated_grads(rank, world, name, stages):
    """delay_grad_allreduce(True), 3 backward calls, then pyrannc.allreduce_grads(model, optimizer, 1/3)."""
    import pyrannc
    torch.manual_seed(5)
    model = models.make(name)
    optimizer = _adam(model.parameters())
    wrapped = pyrannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1)
    pyrannc.delay_grad_allreduce(True)
    try:
        for micro in range(ACCUMULATION):
            wrapped(*models.local_part(models.global_batch(name, BATCH, seed=micro), rank, world)).backward()
        had_overflow = pyrannc.allreduce_grads(wrapped, optimizer, prescale=1.0 / ACCUMULATION)
    finally:
        pyrannc.delay_grad_allreduce(False)
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    return had_overflow, grads


def _accumulate_both(rank, world):
    # 2 replicas of one stage (every gradient summed over both ranks), then 2 stages with a weight tied
    # across them (TinyBert's decoder = embedding)
    return [_accumulated_grads(rank, world, "mlp", 1), _accumulated_grads(rank, world, "bert", 2)]


def _reference_grads(name):
    torch.manual_seed(5)
    model = models.make(name)
    for micro in range(ACCUMULATION):
        (model(*models.global_batch(name, BATCH, seed=micro)) / ACCUMULATION).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_module_level_allreduce_grads_after_accumulation():
    results = run_ranks(_accumulate_both, 2, timeout=300)
    for index, name in enumerate(("mlp", "bert")):
        reference = _reference_grads(name)
        seen = set()
        for rank, per_model in enumerate(results):
            had_overflow, grads = per_model[index]
            assert had_overflow is False
            for key, grad in grads.items():
                torch.testing.assert_close(grad, reference[key], rtol=RTOL, atol=ATOL,
                                           msg=f"{name}, rank {rank}: {key}")
            seen.update(grads)
        assert seen == set(reference), f"{name}: gradients missing on every rank: {set(reference) - seen}"


def _with_upstream_launcher_env(rank, world):
    import pyrannc
    from rannc.config import show_items
    torch.manual_seed(1)
    model = models.make("mlp")
    wrapped = pyrannc.RaNNCModule(model, partition_num=1, profile_repeats=1)
    wrapped(*models.local_part(models.global_batch("mlp", BATCH, seed=0), rank, world)).backward()
    return wrapped.config.show_config_items, wrapped.config.sync_allreduce, show_items(wrapped.config)


def test_upstream_launcher_environment_is_accepted():
    env = {"RANNC_SHOW_CONFIG_ITEMS": "true", "RANNC_SYNC_ALLREDUCE": "true", "RANNC_CHECKPOINTING": "false"}
    for show, sync, text in run_ranks(_with_upstream_launcher_env, 2, env=env, timeout=240):
        assert show is True and sync is True
        assert "show_config_items" in text and "sync_allreduce" in text
