"""The seed's shape of hybrid parallelism on 8 ranks: the tiny BERT config forced into 4 stages of 2
replicas, trained with LAMB-style accumulation, equals single-process training."""

from __future__ import annotations

import copy

import torch

from distributed import run_ranks

BATCH, SEQ = 16, 16


def _model():
    from bert.modeling import BertConfig, BertForPreTrainingWithCriterion
    config = BertConfig.from_json_file("bert/configs/bert_tiny.json")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.num_hidden_layers = 4
    torch.manual_seed(21)
    return BertForPreTrainingWithCriterion(config, full_sequence_mlm=True)


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 8000, (BATCH, SEQ), generator=g)
    # every position is a label: the per-token mean is then the same for any split of the batch
    return [ids, torch.randint(0, 2, (BATCH, SEQ), generator=g), torch.ones(BATCH, SEQ, dtype=torch.long),
            torch.randint(5, 8000, (BATCH, SEQ), generator=g), torch.randint(0, 2, (BATCH,), generator=g)]


def _train(rank, world):
    import rannc
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=4, profile_repeats=1, max_blocks=32)
    losses = []
    for step in range(3):
        batch = _batch(step)
        size = BATCH // world
        loss = wrapped(*[t[rank * size:(rank + 1) * size] for t in batch])
        loss.backward()
        wrapped.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    shape = [(s.ranks, s.first_block, s.end_block) for s in wrapped.deployment.stages]
    return losses, wrapped.state_dict(), shape


def test_four_stages_of_two_replicas_on_eight_ranks_match_single_process():
    results = run_ranks(_train, 8, timeout=600)
    losses, state, shape = results[0]
    assert [len(ranks) for ranks, _, _ in shape] == [2, 2, 2, 2]
    reference = _model()
    ref_model = copy.deepcopy(reference)
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-3, eps=1e-3)
    ref_losses = []
    for step in range(3):
        loss = ref_model(*_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ref_losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
