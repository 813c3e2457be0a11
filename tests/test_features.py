"""Evaluation under no_grad, enable_dropout, autocast and keep_graph, each against single-process results.
Hugging Face transformers models, called directly, are in test_hf_models.py."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from distributed import run_ranks


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 1)

    def forward(self, x, y):
        h = F.dropout(torch.relu(self.a(x)), 0.5, self.training)
        h = F.dropout(torch.relu(self.b(h)), 0.5, self.training)
        return F.mse_loss(self.c(h).squeeze(-1), y)


def _modes(rank, world):
    import rannc
    torch.manual_seed(3)
    model = DropoutMLP()
    reference = copy.deepcopy(model).eval()
    wrapped = rannc.RaNNCModule(model, partition_num=2, profile_repeats=1)
    batch = models.global_batch("mlp", 8, 0)
    local = models.local_part(batch, rank, world)
    train_loss = wrapped(*local).item()          # dropout on: differs from the eval reference
    with torch.no_grad():
        ref = reference(*batch).item()
        wrapped.eval()
        eval_loss = wrapped(*local).item()       # eval mode: no dropout
        wrapped.train()
        wrapped.enable_dropout(False)
        no_dropout_loss = wrapped(*local).item()
        wrapped.enable_dropout(True)
    return train_loss, eval_loss, no_dropout_loss, ref


def test_no_grad_eval_and_enable_dropout_match_the_model_without_dropout():
    for train_loss, eval_loss, no_dropout_loss, ref in run_ranks(_modes, 2, timeout=180):
        assert abs(eval_loss - ref) < 1e-5 * abs(ref)
        assert abs(no_dropout_loss - ref) < 1e-5 * abs(ref)
        assert abs(train_loss - ref) > 1e-4  # dropout really draws masks in train mode


def _autocast(rank, world):
    import rannc
    torch.manual_seed(5)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, partition_num=2, profile_repeats=1)
    batch = models.global_batch("mlp", 8, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wrapped(*models.local_part(batch, rank, world))
        ref = reference(*batch)
    loss.backward()
    ref.backward()
    grads = wrapped.state_dict()  # collective; parameters are unchanged, so this checks placement too
    return loss.item(), ref.item(), len(grads)


def test_autocast_around_the_call_runs_stages_in_bf16():
    for loss, ref, _ in run_ranks(_autocast, 2, timeout=180):
        assert abs(loss - ref) < 1e-6 * abs(ref) + 1e-6  # same bf16 ops, same chunking of one micro-batch
        assert loss != 0.0


def _keep_graph(rank, world):
    import rannc
    torch.manual_seed(5)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, partition_num=2, profile_repeats=1)
    rannc.keep_graph(True)
    batch = models.global_batch("mlp", 8, 0)
    loss = wrapped(*models.local_part(batch, rank, world))
    loss.backward()
    loss.backward()  # second backward on the same forward: gradients double
    rannc.keep_graph(False)
    ref = reference(*batch)
    ref.backward(retain_graph=True)
    ref.backward()
    state = wrapped.state_dict(sync_all_ranks=True)
    norm = wrapped.clip_grad_norm(1e9).item()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9).item()
    return norm, ref_norm, len(state)


def test_keep_graph_allows_a_second_backward():
    for norm, ref_norm, _ in run_ranks(_keep_graph, 2, timeout=180):
        assert abs(norm - ref_norm) < 1e-5 * ref_norm


def _cross_stage_reductions(rank, world):
    """Train the tied-embedding model on 2 stages; record, for every gradient bucket launched, its ranks and
    whether it was launched while the rank's backward still ran (False) or after it, in finish (True)."""
    import torch.distributed as dist

    import rannc
    from rannc.runtime import grads

    import rannc_models

    launches, finishing = [], [False]
    real_launch, real_finish = grads.OverlappedAllReduce._launch, grads.OverlappedAllReduce.finish

    def launch(self, index):
        launches.append((tuple(dist.get_process_group_ranks(self.buckets[index][0])), finishing[0]))
        return real_launch(self, index)

    def finish(self):
        finishing[0] = True
        try:
            return real_finish(self)
        finally:
            finishing[0] = False

    grads.OverlappedAllReduce._launch, grads.OverlappedAllReduce.finish = launch, finish
    model = rannc_models.make("shared_emb", "loss")
    wrapped = rannc.RaNNCModule(model, partition_num=2, min_pipeline=2, max_pipeline=2, profile_repeats=1)
    for step in range(2):
        x, y = rannc_models.global_batch("shared_emb", step)
        half = x.shape[0] // world
        wrapped(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
    return launches


def test_a_tensor_shared_across_stages_is_reduced_after_the_backward():
    """The tied embedding is held by both stages, which reach its gradient at different points of the
    pipeline; its all-reduce must not sit between the pipeline's sends and receives (under NCCL that order
    differs between the two ranks and deadlocks, as seen on 2 H200), so it runs after each rank's backward."""
    for launches in run_ranks(_cross_stage_reductions, 2, timeout=180):
        assert launches and all(ranks == (0, 1) and after for ranks, after in launches), launches


def test_replica_buckets_overlap_the_backward_and_shared_ones_wait_for_its_end(monkeypatch):
    """Stage 0 on ranks 0 and 1 of 2 stages x 2 replicas: its own parameter's bucket is reduced as soon as its
    gradient is ready, the ones shared with stage 1 (two tied weights) only in finish(), in the model's global
    order whatever order this stage uses them in (the other stage's flat buffer must line up)."""
    from types import SimpleNamespace

    from rannc.runtime import grads

    own, tied_a, tied_b = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    holders = {id(own): (0, 1), id(tied_a): (0, 1, 2, 3), id(tied_b): (0, 1, 2, 3)}
    placement = SimpleNamespace(holders_of=lambda p: holders[id(p)],
                                groups={(0, 1): "replicas", (0, 1, 2, 3): "all"},
                                tensors={id(t): t for t in (own, tied_a, tied_b)})
    issued = []

    def all_reduce(flat, group=None, async_op=False):
        issued.append((group, flat.numel()))
        return SimpleNamespace(wait=lambda: None)

    monkeypatch.setattr(grads.dist, "all_reduce", all_reduce)
    reducer = grads.OverlappedAllReduce(placement, [tied_a, own, tied_b], stage_ranks=[0, 1])
    assert [[id(p) for p in bucket] for _, bucket in reducer.buckets] == [[id(own)], [id(tied_a), id(tied_b)]]
    reducer.begin(1)
    for p in (tied_a, own, tied_b):
        p.grad = torch.ones(2)
        reducer._on_grad(p)
    assert issued == [("replicas", 2)]
    reducer.finish()
    assert issued == [("replicas", 2), ("all", 4)]
