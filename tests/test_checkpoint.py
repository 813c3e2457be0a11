"""Model and optimizer state dicts round-trip across partitions: 3 steps, save, new processes with another
partition, load, 3 more steps == 6 uninterrupted single-process steps."""

from __future__ import annotations

import copy

import torch

import models
from distributed import run_ranks

BATCH = 12


def _step(wrapped, optimizer, rank, world, step):
    batch = models.global_batch("bert", BATCH, seed=step)
    loss = wrapped(*models.local_part(batch, rank, world))
    loss.backward()
    return loss


def _first_half(rank, world, path):
    import rannc
    torch.manual_seed(7)
    model = models.make("bert")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, profile_repeats=1)
    for step in range(3):
        _step(wrapped, optimizer, rank, world, step)
        wrapped.clip_grad_norm(0.5)
        optimizer.step()
        optimizer.zero_grad()
    model_state = wrapped.state_dict(sync_all_ranks=False, no_hook=True)
    optimizer_state = optimizer.state_dict()
    if rank == 0:
        torch.save({"model": model_state, "optimizer": optimizer_state}, path)
    rannc.barrier()


def _second_half(rank, world, path, stages):
    import rannc
    torch.manual_seed(99)  # a different init: everything must come from the checkpoint
    model = models.make("bert")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    checkpoint = torch.load(path, weights_only=False)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1)
    wrapped.load_state_dict(checkpoint["model"])
    global_optimizer_state = checkpoint["optimizer"]
    losses = []
    for step in range(3, 6):
        losses.append(_step(wrapped, optimizer, rank, world, step).item())
        if global_optimizer_state:  # the seed's pattern: load once the partition is known
            optimizer.load_state_dict(global_optimizer_state)
            global_optimizer_state = None
        wrapped.clip_grad_norm(0.5)
        optimizer.step()
        optimizer.zero_grad()
    return losses, wrapped.state_dict(sync_all_ranks=True)


def _reference():
    torch.manual_seed(7)
    model = models.make("bert")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    losses = []
    for step in range(6):
        loss = model(*models.global_batch("bert", BATCH, seed=step))
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    return losses, copy.deepcopy(model.state_dict())


def test_resume_on_another_partition_equals_uninterrupted_training(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    run_ranks(_first_half, 2, path, timeout=240)
    results = run_ranks(_second_half, 3, path, 3, timeout=240)
    ref_losses, ref_state = _reference()
    for rank, (losses, state) in enumerate(results):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[3:]), rtol=1e-5, atol=1e-6)
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")
