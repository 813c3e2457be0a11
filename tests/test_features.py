"""Evaluation under no_grad, enable_dropout, autocast, keep_graph, and HF transformers' BERT, each
against single-process results."""

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


class HFPretraining(nn.Module):
    """The user's adapter: HF's model unmodified, called with keywords, returning its loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          labels=labels, next_sentence_label=next_sentence_label).loss


def _hf_model():
    from transformers import BertConfig, BertForPreTraining
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(11)
    return HFPretraining(BertForPreTraining(config))


def _hf_batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (8, 16), generator=g)
    return [ids, torch.ones(8, 16, dtype=torch.long), torch.zeros(8, 16, dtype=torch.long),
            torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 2, (8,), generator=g)]


def _hf_train(rank, world):
    import rannc
    model = _hf_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, profile_repeats=1)
    losses = []
    for step in range(4):
        loss = wrapped(*models.local_part(_hf_batch(step), rank, world))
        loss.backward()
        wrapped.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, wrapped.state_dict()


def test_hf_transformers_bert_trains_under_rannc():
    results = run_ranks(_hf_train, 2, timeout=300)
    model = _hf_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_losses = []
    for step in range(4):
        loss = model(*_hf_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ref_losses.append(loss.item())
    losses, state = results[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
