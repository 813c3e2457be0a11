"""Hugging Face transformers models, unmodified and called as their documentation calls them (keyword
arguments, `out = model(..., labels=...)`, `out.loss.backward()`), trained under rannc on 2 gloo ranks with
a forced 2-stage pipeline of 3 micro-batches, against single-process training of a deep copy on the global
batch: BertForPreTraining, GPT2LMHeadModel (use_cache left at its default, whose KV cache rannc drops with one
warning, and use_cache=False passed in the call) and T5ForConditionalGeneration (encoder-decoder); all
three tie their input and output embeddings, one weight used at both ends of the graph. LlamaForCausalLM
(grouped-query attention, rotary positions, RMSNorm) and AlbertForPreTraining (one layer's weights shared by
every layer, so by both stages) too. Checked: the
returned object is the model's output class, the loss every step (the same on both ranks), each rank's rows
of the batched outputs, every parameter after 3 Adam steps with gradient clipping, and an eval-mode loss.

Every model is built from a tiny config with all dropout off, so both sides are deterministic. The labels
have no ignored (-100) tokens: HF's per-token mean losses then equal the mean over samples, which is what
rannc combines over micro-batches and ranks. All models share one run_ranks call (process start is costly)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from distributed import run_ranks

GLOBAL_BATCH = 8
SEQ = 12
VOCAB = 64
STEPS = 3
MICRO = 3
RTOL = 1e-5


# ---- models ----------------------------------------------------------------------------------------
def _bert():
    from transformers import BertConfig, BertForPreTraining
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ, type_vocab_size=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForPreTraining(config)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(config)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      dropout_rate=0.0, classifier_dropout=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def _albert():
    from transformers import AlbertConfig, AlbertForPreTraining
    config = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AlbertForPreTraining(config)


# ---- global batches (the same on every rank; each rank passes its rows) -------------------------------
def _bert_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    mask = torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long)
    mask[1::2, -3:] = 0  # padding in every other sample: the attention mask matters
    types = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)
    types[:, SEQ // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
            "next_sentence_label": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)}


def _gpt2_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    # as in the docs: model(**tokenizer(...), labels=input_ids)
    return {"input_ids": ids, "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long), "labels": ids}


def _t5_batch(step):
    g = torch.Generator().manual_seed(300 + step)
    return {"input_ids": torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ // 2), generator=g)}


def _albert_batch(step):
    batch = _bert_batch(400 + step)
    return {**batch, "sentence_order_label": batch.pop("next_sentence_label")}


def _llama_batch(step):
    return _gpt2_batch(500 + step)


# name: (build, batch, constant keyword arguments of the call, batched outputs to compare by rows)
CASES = {
    "bert": (_bert, _bert_batch, {}, ["prediction_logits", "seq_relationship_logits"]),
    "gpt2": (_gpt2, _gpt2_batch, {}, ["logits"]),
    "gpt2_no_cache": (_gpt2, _gpt2_batch, {"use_cache": False}, ["logits"]),
    "t5": (_t5, _t5_batch, {}, ["logits", "encoder_last_hidden_state"]),
    "llama": (_llama, _llama_batch, {"use_cache": False}, ["logits"]),      # grouped-query attention, RoPE
    "albert": (_albert, _albert_batch, {}, ["prediction_logits", "sop_logits"]),   # one layer's weights, shared
}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """test_equivalence's error measure: the largest difference relative to the reference's magnitude."""
    return (a.detach().float() - ref.detach().float()).abs().max().item() / (ref.detach().abs().max().item() + 1e-3)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train_pair(rank, world, name):
    """Train the model under rannc and, in this process, a deep copy on the global batch; return the
    largest differences and what else the test checks."""
    import rannc
    build, make_batch, constants, compared = CASES[name]
    warnings = _Warnings()
    logging.getLogger("rannc.RaNNCModule").addHandler(warnings)
    torch.manual_seed(1234)
    model = build()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(reference.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, eps=1e-3)
    # 2 stages on the 2 ranks; 3 micro-batches of 3, 3 and 2 rows: a pipeline, with unequal weights
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, min_pipeline=MICRO, max_pipeline=MICRO,
                                profile_repeats=1)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    result = {"loss_err": [], "losses": [], "output_err": {}, "missing": []}
    for step in range(STEPS):
        batch = make_batch(step)
        out = wrapped(**{k: v[rows] for k, v in batch.items()}, **constants)
        ref = reference(**batch, **constants)
        out.loss.backward()
        ref.loss.backward()
        result["loss_err"].append(_rel(out.loss, ref.loss))
        result["losses"].append(out.loss.item())
        result["types"] = (type(out) is type(ref), type(out).__name__, type(ref).__name__)
        for key in compared:
            ref_rows = ref[key][rows]
            if out.get(key) is None or out[key].shape != ref_rows.shape:
                result["missing"].append(f"{key}: {None if out.get(key) is None else tuple(out[key].shape)}")
                continue
            result["output_err"][key] = max(result["output_err"].get(key, 0.0), _rel(out[key], ref_rows))
        # the model's non-tensor outputs (a KV cache), and what rannc returns in their place
        result["dropped"] = {k: (out.get(k), type(v).__name__) for k, v in ref.items()
                             if not isinstance(v, torch.Tensor)}
        wrapped.clip_grad_norm(1.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    # eval mode: these models read self.training (dropout rates, checkpointing), and the capture found their
    # eval-mode graphs equal to the train-mode ones beyond what rannc switches, so evaluation runs
    wrapped.eval()
    reference.eval()
    with torch.no_grad():
        batch = make_batch(STEPS)
        out = wrapped(**{k: v[rows] for k, v in batch.items()}, **constants)
        result["eval_err"] = _rel(out.loss, reference(**batch, **constants).loss)
    state = wrapped.state_dict(rank0_only=False)
    ref_state = reference.state_dict()
    result["keys"] = (sorted(state), sorted(ref_state))
    result["param_err"] = max(_rel(state[k], v) for k, v in ref_state.items() if k in state)
    result["moved"] = max(_rel(v, initial[k]) for k, v in reference.named_parameters())
    result["plan"] = (len(wrapped.deployment.stages), wrapped.deployment.microbatch_count)
    result["warnings"] = [m for m in warnings.messages if "drops these outputs" in m]
    logging.getLogger("rannc.RaNNCModule").removeHandler(warnings)
    return result


def _all_cases(rank, world, names):
    return {name: _train_pair(rank, world, name) for name in names}


def _check(name, rank, r):
    same_type, got, expected = r["types"]
    assert same_type, f"{name}: rannc returned a {got}, the model returns a {expected}"
    assert r["plan"] == (2, MICRO), f"{name}: (stages, micro-batches) = {r['plan']}"
    assert r["keys"][0] == r["keys"][1], f"{name}: state dict keys differ"
    assert not r["missing"], f"{name}, rank {rank}: outputs missing or of the wrong shape: {r['missing']}"
    assert max(r["loss_err"]) < RTOL, f"{name}: losses differ by {r['loss_err']} (relative)"
    for key, err in r["output_err"].items():
        assert err < RTOL, f"{name}, rank {rank}: {key} differs from the reference's rows by {err:.2e}"
    assert r["param_err"] < RTOL, f"{name}: parameters differ by {r['param_err']:.2e} (relative)"
    assert r["eval_err"] < RTOL, f"{name}: the eval-mode loss differs by {r['eval_err']:.2e} (relative)"
    assert r["moved"] > 1e-4, f"{name}: training did not change the parameters ({r['moved']:.1e})"
    if name in ("gpt2", "t5"):  # use_cache defaults to True: the model returns a KV cache, rannc drops it
        assert r["dropped"], f"{name}: the model returned no cache"
        for key, (value, kind) in r["dropped"].items():
            assert value is None, f"{name}: {key} is {value!r}, not None"
            if rank == 0:  # rannc logs on rank 0, once, not on every call
                assert len(r["warnings"]) == 1 and f"{key} ({kind})" in r["warnings"][0], r["warnings"]
    else:
        assert not r["dropped"] and not r["warnings"], (name, r["dropped"], r["warnings"])


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, 2, list(CASES), timeout=360)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_trains_as_in_one_process(results, name):
    for rank, per_rank in enumerate(results):
        _check(name, rank, per_rank[name])
    assert results[0][name]["losses"] == results[1][name]["losses"], f"{name}: the ranks' losses differ"
