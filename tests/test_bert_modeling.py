"""Tests for bert/modeling.py: config files, shapes, the tied decoder, torch.export capture, the masked
MLM head against the seed's full-sequence head, and the Megatron options, all on tiny models on the CPU."""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bert.modeling import (
    MASKED_SCORE,
    BertConfig,
    BertForPreTraining,
    BertForPreTrainingWithCriterion,
    BertPretrainingCriterion,
    count_parameters,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "bert" / "configs"
BATCH_SIZE, SEQ_LEN = 2, 16
MAX_PREDICTIONS = 5  # prediction slots per sequence, more than make_batch's 3 labels: padding slots too


def tiny_config(**overrides) -> BertConfig:
    config = BertConfig.from_json_file(CONFIG_DIR / "bert_tiny.json")
    return dataclasses.replace(config, **overrides)


def deterministic_tiny_config(**overrides) -> BertConfig:
    return tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)


def make_batch(config: BertConfig, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A pretraining batch with padding at the end of the second sequence and -1 on unmasked positions."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (BATCH_SIZE, SEQ_LEN), generator=generator)
    token_type_ids = torch.zeros(BATCH_SIZE, SEQ_LEN, dtype=torch.long)
    token_type_ids[:, SEQ_LEN // 2 :] = 1
    attention_mask = torch.ones(BATCH_SIZE, SEQ_LEN, dtype=torch.long)
    attention_mask[1, SEQ_LEN - 4 :] = 0
    masked_lm_labels = torch.full((BATCH_SIZE, SEQ_LEN), -1, dtype=torch.long)
    masked_lm_labels[:, 1:4] = input_ids[:, 1:4]
    next_sentence_labels = torch.tensor([0, 1])
    return input_ids, token_type_ids, attention_mask, masked_lm_labels, next_sentence_labels


def to_masked_batch(batch: tuple[torch.Tensor, ...], max_predictions: int = MAX_PREDICTIONS) -> tuple:
    """The default head's form of a make_batch batch: each row's labelled positions (ascending) and their
    ids, padded to max_predictions slots with position 0 and id -1, as bert.data yields them."""
    input_ids, token_type_ids, attention_mask, masked_lm_labels, next_sentence_labels = batch
    masked_lm_positions = torch.zeros(len(masked_lm_labels), max_predictions, dtype=torch.long)
    masked_lm_ids = torch.full_like(masked_lm_positions, -1)
    for row, labels in enumerate(masked_lm_labels):
        labelled = torch.nonzero(labels != -1).flatten()
        masked_lm_positions[row, : len(labelled)] = labelled
        masked_lm_ids[row, : len(labelled)] = labels[labelled]
    return input_ids, token_type_ids, attention_mask, masked_lm_positions, masked_lm_ids, next_sentence_labels


@pytest.mark.parametrize("config_name", ["bert_tiny", "bert_base", "bert_large", "bert_4.9b"])
def test_config_files_round_trip_through_json(config_name, tmp_path):
    config = BertConfig.from_json_file(CONFIG_DIR / f"{config_name}.json")
    saved_path = tmp_path / "config.json"
    saved_path.write_text(config.to_json_string())
    assert BertConfig.from_json_file(saved_path) == config
    assert BertConfig.from_dict(config.to_dict()) == config


def test_config_rejects_unknown_key_and_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"'hiden_size'.*did you mean 'hidden_size'"):
        BertConfig.from_dict({"hiden_size": 64})


def test_vocab_is_padded_to_multiple_of_8_but_kept_as_given():
    config = BertConfig(vocab_size=30522)
    assert config.vocab_size == 30522
    assert config.padded_vocab_size == 30528
    assert BertConfig(vocab_size=8192).padded_vocab_size == 8192


def test_tiny_forward_shapes():
    config = tiny_config(vocab_size=8190)  # not a multiple of 8, so padding shows in the logits
    model = BertForPreTraining(config)
    input_ids, token_type_ids, attention_mask, _, _ = make_batch(config)
    prediction_scores, seq_relationship_score = model(input_ids, token_type_ids, attention_mask)
    assert prediction_scores.shape == (BATCH_SIZE, SEQ_LEN, 8192)
    assert seq_relationship_score.shape == (BATCH_SIZE, 2)


def test_decoder_weight_is_the_word_embedding_parameter():
    model = BertForPreTraining(tiny_config())
    word_embedding_weight = model.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is word_embedding_weight
    assert sum(parameter is word_embedding_weight for parameter in model.parameters()) == 1
    assert model.mlm_head.bias is not word_embedding_weight


def test_tied_weight_gradient_is_sum_of_embedding_and_decoder_gradients():
    torch.manual_seed(0)
    config = deterministic_tiny_config()
    tied_model = BertForPreTrainingWithCriterion(config)
    untied_model = copy.deepcopy(tied_model)
    untied_model.mlm_head.decoder.weight = nn.Parameter(tied_model.embeddings.word_embeddings.weight.clone())
    batch = to_masked_batch(make_batch(config))

    tied_model(*batch).backward()
    untied_model(*batch).backward()

    embedding_grad = untied_model.embeddings.word_embeddings.weight.grad
    decoder_grad = untied_model.mlm_head.decoder.weight.grad
    assert embedding_grad.abs().sum() > 0 and decoder_grad.abs().sum() > 0
    torch.testing.assert_close(
        tied_model.embeddings.word_embeddings.weight.grad, embedding_grad + decoder_grad, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("full_sequence_mlm", [False, True], ids=["masked_positions", "full_sequence"])
def test_export_non_strict_in_train_mode_matches_eager_loss_and_gradients(full_sequence_mlm):
    torch.manual_seed(0)
    config = deterministic_tiny_config()
    model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=full_sequence_mlm).train()
    batch = make_batch(config) if full_sequence_mlm else to_masked_batch(make_batch(config))

    exported = torch.export.export(model, batch, strict=False)

    eager_loss = model(*batch)
    eager_loss.backward()
    eager_grads = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters(remove_duplicate=False)
    }
    model.zero_grad(set_to_none=True)

    exported_module = exported.module()
    exported_loss = exported_module(*batch)
    exported_loss.backward()

    torch.testing.assert_close(exported_loss, eager_loss, rtol=0, atol=1e-6)
    exported_parameters = dict(exported_module.named_parameters())
    assert len(exported_parameters) == len(list(model.parameters()))
    for name, parameter in exported_parameters.items():
        torch.testing.assert_close(parameter.grad, eager_grads[name], rtol=0, atol=1e-6, msg=name)


def test_masked_head_scores_the_full_sequence_logits_at_the_positions():
    torch.manual_seed(0)
    config = deterministic_tiny_config(vocab_size=8190)
    model = BertForPreTraining(config).eval()
    input_ids, token_type_ids, attention_mask, _, _ = make_batch(config)
    masked_lm_positions = torch.tensor([[1, 5, 15, 0, 0], [2, 3, 11, 9, 0]])  # any order; 0 pads

    with torch.no_grad():
        masked_scores, masked_nsp = model(input_ids, token_type_ids, attention_mask, masked_lm_positions)
        full_scores, full_nsp = model(input_ids, token_type_ids, attention_mask)

    assert masked_scores.shape == (BATCH_SIZE, MAX_PREDICTIONS, 8192)  # fixed: slots, not real predictions
    expected = full_scores[torch.arange(BATCH_SIZE)[:, None], masked_lm_positions]
    torch.testing.assert_close(masked_scores, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_nsp, full_nsp, rtol=0, atol=0)


def test_masked_head_gives_the_full_sequence_head_loss_and_gradients():
    """The default head transforms and decodes only the masked positions; on the same batch and weights
    (fp32, dropout off) its loss and every parameter's gradient equal the seed's full-sequence head's. The
    rows have different counts of labels (5 and 2 of 5 slots): the MLM loss stays the mean over all
    labelled tokens of the batch, whatever the padding."""
    torch.manual_seed(0)
    config = deterministic_tiny_config()
    masked_model = BertForPreTrainingWithCriterion(config).train()
    full_model = BertForPreTrainingWithCriterion(config, full_sequence_mlm=True).train()
    full_model.load_state_dict(masked_model.state_dict())
    input_ids, token_type_ids, attention_mask, _, next_sentence_labels = make_batch(config)
    masked_lm_labels = torch.full((BATCH_SIZE, SEQ_LEN), -1)
    for row, positions in enumerate(([1, 4, 7, 10, 15], [2, 9])):
        masked_lm_labels[row, positions] = input_ids[row, positions]
    full_batch = (input_ids, token_type_ids, attention_mask, masked_lm_labels, next_sentence_labels)
    masked_batch = to_masked_batch(full_batch)
    assert masked_batch[3].tolist() == [[1, 4, 7, 10, 15], [2, 9, 0, 0, 0]]
    assert masked_batch[4][1, 2:].tolist() == [-1, -1, -1]

    masked_loss = masked_model(*masked_batch)
    full_loss = full_model(*full_batch)
    masked_loss.backward()
    full_loss.backward()

    torch.testing.assert_close(masked_loss, full_loss, rtol=0, atol=1e-6)
    full_parameters = dict(full_model.named_parameters())
    assert full_parameters.keys() == dict(masked_model.named_parameters()).keys()
    for name, parameter in masked_model.named_parameters():
        assert parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, full_parameters[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_masked_head_ignores_padding_slots_whatever_their_id():
    """NVIDIA's shards pad masked_lm_ids with 0 ([PAD]) where bert.data puts -1; a slot at position 0
    ([CLS], never masked) is padding either way."""
    torch.manual_seed(0)
    config = deterministic_tiny_config()
    model = BertForPreTrainingWithCriterion(config).eval()
    batch = to_masked_batch(make_batch(config))
    masked_lm_ids, next_sentence_labels = batch[4], batch[5]
    zero_padded = masked_lm_ids.masked_fill(masked_lm_ids == -1, 0)
    assert (zero_padded == 0).sum() == 4  # 2 padding slots per row

    with torch.no_grad():
        loss = model(*batch)
        raw_loss = model(*batch[:4], zero_padded, next_sentence_labels)
        # Taken at face value, the 0s would be 4 more predictions (of [PAD] at [CLS]).
        scores, nsp_scores = BertForPreTraining.forward(model, *batch[:4])
        counted_loss = model.criterion(scores, nsp_scores, zero_padded, next_sentence_labels)
    torch.testing.assert_close(raw_loss, loss, rtol=0, atol=0)
    assert abs(counted_loss - loss) > 1e-3


def test_each_head_names_its_inputs_when_given_the_other_heads_batch():
    config = tiny_config()
    batch = make_batch(config)
    with pytest.raises(TypeError, match=r"masked_lm_positions, masked_lm_ids, next_sentence_labels: 6 tensors, got 5"):
        BertForPreTrainingWithCriterion(config)(*batch)
    with pytest.raises(TypeError, match=r"full_sequence_mlm=True\) takes .*masked_lm_labels, next_sentence_labels: 5"):
        BertForPreTrainingWithCriterion(config, full_sequence_mlm=True)(*to_masked_batch(batch))


def test_scale_query_key_matches_plain_attention_in_fp32():
    """The layer-scaled attention (taken for fp16 activations) computes what plain attention does, for every
    layer number; in fp32 and bf16 the model takes the fused attention whatever the option says."""
    torch.manual_seed(0)
    config = deterministic_tiny_config(num_hidden_layers=3)  # layer numbers 1..3 all exercised
    plain_model = BertForPreTraining(config).eval()
    scaled_model = BertForPreTraining(dataclasses.replace(config, scale_query_key=True)).eval()
    scaled_model.load_state_dict(plain_model.state_dict())
    input_ids, token_type_ids, attention_mask, _, _ = make_batch(config)
    additive_mask = (1.0 - attention_mask[:, None, None, :].float()) * MASKED_SCORE
    shape = (2, config.num_attention_heads, input_ids.shape[1], config.head_size)
    query, key, value = (torch.randn(shape) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                             attn_mask=additive_mask[:2] > MASKED_SCORE / 2)
    for layer in scaled_model.encoder.layers:
        scaled = layer.attention.layer_scaled_attention(query, key, value, additive_mask[:2], 0.0)
        torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-5)

    with torch.no_grad():
        plain_outputs = plain_model(input_ids, token_type_ids, attention_mask)
        scaled_outputs = scaled_model(input_ids, token_type_ids, attention_mask)
    for plain_output, scaled_output in zip(plain_outputs, scaled_outputs):
        torch.testing.assert_close(scaled_output, plain_output, rtol=0, atol=1e-5)

    attention, taken = scaled_model.encoder.layers[2].attention, []
    attention.layer_scaled_attention = lambda *args: taken.append(args[0].dtype) or args[2]
    with torch.no_grad():
        attention.half()(torch.randn(2, SEQ_LEN, config.hidden_size, dtype=torch.float16), additive_mask.half())
        attention.float()(torch.randn(2, SEQ_LEN, config.hidden_size), additive_mask)
    assert taken == [torch.float16]   # fp16 activations only


def test_megatron_residual_connection_builds_and_trains():
    config = tiny_config(megatron_residual_connection=True, scale_query_key=True, deep_weight_init=True)
    model = BertForPreTrainingWithCriterion(config).train()
    assert isinstance(model.encoder.final_layer_norm, nn.LayerNorm)
    loss = model(*to_masked_batch(make_batch(config)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_megatron_residual_connection_drops_the_embedding_layer_norm():
    """As in RaNNC's BERT example: under the option the embedding sum is not normalised (the first
    layer's pre-LayerNorm does it), so the embeddings own no LayerNorm parameters at all."""
    torch.manual_seed(0)
    config = deterministic_tiny_config(megatron_residual_connection=True)
    model = BertForPreTraining(config).train()  # train mode: dropout is off only through the config
    embeddings = model.embeddings
    assert not any(isinstance(module, nn.LayerNorm) for module in embeddings.modules())
    assert sorted(name for name, _ in embeddings.named_parameters()) == [
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "word_embeddings.weight",
    ]
    input_ids, token_type_ids, _, _, _ = make_batch(config)

    expected = (
        embeddings.word_embeddings.weight[input_ids]
        + embeddings.position_embeddings.weight[:SEQ_LEN]
        + embeddings.token_type_embeddings.weight[token_type_ids]
    )
    torch.testing.assert_close(embeddings(input_ids, token_type_ids), expected, rtol=0, atol=0)


def test_post_layer_norm_bert_keeps_the_embedding_layer_norm():
    torch.manual_seed(0)
    config = deterministic_tiny_config()
    embeddings = BertForPreTraining(config).embeddings
    assert isinstance(embeddings.layer_norm, nn.LayerNorm)
    input_ids, token_type_ids, _, _, _ = make_batch(config)
    output = embeddings(input_ids, token_type_ids)
    # LayerNorm with its initial weight 1 and bias 0: zero mean and unit variance per position.
    torch.testing.assert_close(output.mean(-1), torch.zeros(BATCH_SIZE, SEQ_LEN), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        output.var(-1, unbiased=False), torch.ones(BATCH_SIZE, SEQ_LEN), rtol=0, atol=1e-3
    )


def test_deep_weight_init_shrinks_output_projections_only():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=8)
    deep_model = BertForPreTraining(dataclasses.replace(config, deep_weight_init=True))
    normal_model = BertForPreTraining(config)
    scaled_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)

    for layer in deep_model.encoder.layers:
        assert layer.attention.output.weight.std().item() == pytest.approx(scaled_std, rel=0.05)
        assert layer.mlp.output.weight.std().item() == pytest.approx(scaled_std, rel=0.05)
        assert layer.attention.query.weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    for layer in normal_model.encoder.layers:
        assert layer.attention.output.weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)
        assert layer.mlp.output.weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)


def test_4_9b_config_has_4_9_billion_parameters():
    config = BertConfig.from_json_file(CONFIG_DIR / "bert_4.9b.json")
    with torch.device("meta"):
        model = BertForPreTrainingWithCriterion(config)
    parameter_count = count_parameters(model)
    print(f"bert_4.9b parameters: {parameter_count:,}")
    assert parameter_count == pytest.approx(4.9e9, abs=0.1e9)

    # Exactly the seed's model: RaNNC's BERT example with its Megatron options (no embedding LayerNorm,
    # pre-LN layers, one LayerNorm after the last layer), vocab padded to 30,528, decoder tied.
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embeddings = (config.padded_vocab_size + config.max_position_embeddings + config.type_vocab_size) * hidden
    per_layer = (
        4 * (hidden * hidden + hidden)  # query, key, value, attention output
        + (hidden * intermediate + intermediate)
        + (intermediate * hidden + hidden)
        + 2 * 2 * hidden  # pre-LN of the attention and of the MLP
    )
    final_layer_norm = 2 * hidden
    pooler = hidden * hidden + hidden
    mlm_head = (hidden * hidden + hidden) + 2 * hidden + config.padded_vocab_size  # transform, LN, bias
    nsp_head = 2 * hidden + 2
    expected = embeddings + layers * per_layer + final_layer_norm + pooler + mlm_head + nsp_head
    assert expected == 4_906_403_650
    assert parameter_count == expected


def test_criterion_ignores_minus_one_labels():
    torch.manual_seed(0)
    vocab_size = 16
    prediction_scores = torch.randn(BATCH_SIZE, 4, vocab_size)
    seq_relationship_score = torch.randn(BATCH_SIZE, 2)
    masked_lm_labels = torch.tensor([[3, -1, -1, 7], [-1, 5, -1, -1]])
    next_sentence_labels = torch.tensor([1, -1])

    loss = BertPretrainingCriterion(vocab_size)(
        prediction_scores, seq_relationship_score, masked_lm_labels, next_sentence_labels
    )

    labelled = masked_lm_labels != -1
    expected_mlm = nn.functional.cross_entropy(prediction_scores[labelled], masked_lm_labels[labelled])
    expected_nsp = nn.functional.cross_entropy(seq_relationship_score[:1], next_sentence_labels[:1])
    torch.testing.assert_close(loss, expected_mlm + expected_nsp)


@pytest.mark.parametrize("field,value", [("hidden_size", -4), ("num_hidden_layers", 0), ("vocab_size", 2.5),
                                         ("hidden_dropout_prob", 1.0), ("layer_norm_eps", 0),
                                         ("num_attention_heads", True)])
def test_config_values_that_cannot_work_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"BertConfig {field} must be"):
        BertConfig.from_dict({field: value})
