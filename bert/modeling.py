"""BERT for pretraining (masked LM + next sentence), written to be read against the paper and captured whole.
The loss lives inside `BertForPreTrainingWithCriterion` so that rannc can partition model and loss together.
By default its MLM head runs only on the masked positions (gathered into a fixed B x max_predictions_per_seq
shape, as NVIDIA's later recipe does); `full_sequence_mlm=True` keeps the seed's head over every position.

Behaviour follows NVIDIA's BERT recipe (tied MLM decoder, vocab padded to a multiple of 8, labels of -1
ignored) plus three Megatron-LM options used for the 4.9B-parameter model: pre-LayerNorm residuals (which
also drop the embedding LayerNorm and add one after the last layer), query-key layer scaling and scaled
init of output projections. The forward pass has no data-dependent Python control flow and no in-place
module state, so `torch.export.export(..., strict=False)` captures it in train mode.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# NVIDIA's additive mask value: large enough to zero a softmax entry, small enough to stay finite in fp16.
MASKED_SCORE = -10000.0

# Plain functions and partials, not lambdas, so a whole model can still be pickled.
ACTIVATIONS = {
    "gelu": F.gelu,  # erf-based, as in the original BERT
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    """Model shape and options; JSON files use the same keys as Google's and NVIDIA's bert_config.json."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # Megatron-LM options (see the RaNNC BERT seed): all off reproduces plain BERT.
    megatron_residual_connection: bool = False
    scale_query_key: bool = False
    deep_weight_init: bool = False

    def __post_init__(self) -> None:
        """Refuse values that would fail deep inside torch (or train nonsense), naming the field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig {name} must be a positive integer (got {value!r})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig {name} must be a probability in [0, 1) (got {value!r})")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"BertConfig {name} must be a positive number (got {value!r})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)} (got {self.hidden_act!r})")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )

    def without_dropout(self) -> BertConfig:
        """The same model with both dropouts at 0: runs whose losses are compared step by step draw no masks."""
        return dataclasses.replace(self, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 8, as NVIDIA does, so the decoder GEMM suits tensor cores."""
        return self.vocab_size + (-self.vocab_size) % 8

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        """Build a config, refusing unknown keys: a typo would otherwise silently fall back to a default."""
        known_keys = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in known_keys:
                close_matches = difflib.get_close_matches(key, known_keys, n=1)
                hint = f"; did you mean {close_matches[0]!r}?" if close_matches else ""
                raise ValueError(
                    f"unknown BertConfig key {key!r}{hint} (known keys: {', '.join(known_keys)})"
                )
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        with open(path, encoding="utf-8") as json_file:
            return cls.from_dict(json.load(json_file))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class BertEmbeddings(nn.Module):
    """Sum of word, position and segment embeddings, then LayerNorm and dropout.

    With `megatron_residual_connection` there is no LayerNorm here (as in RaNNC's BERT example and
    Megatron-LM): the first layer's pre-LayerNorm normalises its sublayer input, and the un-normalised sum
    is the start of the residual stream."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # Identity, not an unused LayerNorm: no parameters that never get a gradient, and the 4.9B
        # configuration has exactly the seed's parameters.
        self.layer_norm = (
            nn.Identity()
            if config.megatron_residual_connection
            else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # Computed, not a buffer: no module state, and it follows the input's device and length.
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.layer_norm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with its output projection (the projection's dropout is the layer's job)."""

    def __init__(self, config: BertConfig, layer_number: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dropout_prob = config.attention_probs_dropout_prob
        self.scale_query_key = config.scale_query_key
        # 1-based, as in Megatron's apply_query_key_layer_scaling: deeper layers scale down more.
        self.layer_number = layer_number
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = x.shape
        return x.view(batch_size, seq_len, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_size = hidden_states.shape
        query = self.split_heads(self.query(hidden_states))
        key = self.split_heads(self.key(hidden_states))
        value = self.split_heads(self.value(hidden_states))
        dropout_p = self.dropout_prob if self.training else 0.0

        if self.scale_query_key and query.dtype == torch.float16:
            context = self.layer_scaled_attention(query, key, value, additive_mask, dropout_p)
        else:
            # The layer scaling guards a QK^T materialised in fp16. bf16 and fp32 have fp32's range, and the
            # fused kernels (flash, memory-efficient) keep QK^T in fp32 registers, never in memory: in a model
            # captured by rannc (autocast off, so fp32 here) an fp16 autocast later runs these kernels on GPUs.
            # The unfused path moved ~0.8 GB per layer and step of the 4.9B model's forward (fp32 scores,
            # softmax, dropout, casts) and issued ten ops where this is one.
            # A boolean mask carries no dtype: a captured graph then runs unchanged under autocast.
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=additive_mask > MASKED_SCORE / 2, dropout_p=dropout_p
            )
        context = context.transpose(1, 2).reshape(batch_size, seq_len, hidden_size)
        return self.output(context)

    def layer_scaled_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        additive_mask: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        """Same result as plain attention, but QK^T is computed divided by the layer number so it cannot
        overflow fp16 in deep models; the factor is multiplied back in fp32 just before the softmax. Taken for
        fp16 activations only (see forward)."""
        coefficient = float(self.layer_number)
        scaled_query = query / (math.sqrt(self.head_size) * coefficient)
        scores = torch.matmul(scaled_query, key.transpose(-1, -2)).float() * coefficient
        probs = torch.softmax(scores + additive_mask.float(), dim=-1)
        probs = F.dropout(probs, p=dropout_p, training=self.training)
        return torch.matmul(probs.to(value.dtype), value)


class BertMLP(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.activation(self.intermediate(x)))


class BertLayer(nn.Module):
    """One transformer block. BERT normalises after each residual add (post-LN); Megatron normalises the
    input of each sublayer (pre-LN), which keeps very deep stacks such as the 96-layer 4.9B model stable."""

    def __init__(self, config: BertConfig, layer_number: int):
        super().__init__()
        self.pre_layer_norm = config.megatron_residual_connection
        self.attention = BertSelfAttention(config, layer_number)
        self.attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BertMLP(config)
        self.mlp_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        if self.pre_layer_norm:
            x = x + self.dropout(self.attention(self.attention_layer_norm(x), additive_mask))
            x = x + self.dropout(self.mlp(self.mlp_layer_norm(x)))
        else:
            x = self.attention_layer_norm(x + self.dropout(self.attention(x, additive_mask)))
            x = self.mlp_layer_norm(x + self.dropout(self.mlp(x)))
        return x


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            BertLayer(config, layer_number) for layer_number in range(1, config.num_hidden_layers + 1)
        )
        # With pre-LN the residual stream is never normalised inside the stack, so Megatron adds one LN
        # at the end; post-LN layers already end with one.
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.megatron_residual_connection
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, additive_mask)
        return self.final_layer_norm(x)


class BertPooler(nn.Module):
    """Summarises the sequence by its [CLS] position, for the next-sentence head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))


def gather_positions(sequence_output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The [B, P, H] rows of a [B, S, H] sequence at [B, P] positions.

    A fixed shape whatever the count of real predictions (padding slots read position 0, [CLS], and carry an
    ignored label), so torch.export captures it without data-dependent shapes; the backward scatters back."""
    index = positions.unsqueeze(-1).expand(-1, -1, sequence_output.size(-1))
    return torch.gather(sequence_output, 1, index)


class BertMLMHead(nn.Module):
    """Transform, then score every vocab entry. `decoder.weight` is replaced by the word-embedding weight
    in `BertForPreTraining`, so the input and output vocab share one matrix; the bias stays separate.

    Given `masked_lm_positions` ([B, P]), only those rows are transformed and scored ([B, P, V] logits,
    NVIDIA's later recipe); without, every position is ([B, S, V], the seed's head)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, sequence_output: torch.Tensor, masked_lm_positions: torch.Tensor | None = None) -> torch.Tensor:
        if masked_lm_positions is not None:
            sequence_output = gather_positions(sequence_output, masked_lm_positions)
        transformed = self.layer_norm(self.activation(self.dense(sequence_output)))
        return self.decoder(transformed) + self.bias


class BertForPreTraining(nn.Module):
    """BERT with both pretraining heads. Returns MLM logits over the padded vocab and next-sentence logits
    (B×2). The MLM logits are B×P×V at the given `masked_lm_positions` (B×P), or B×S×V at every position
    without them (as NVIDIA's recipe at the pinned revision does)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.mlm_head = BertMLMHead(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.apply(self.init_weights)
        if config.deep_weight_init:
            self.scale_output_projection_init()

    def init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def scale_output_projection_init(self) -> None:
        """Megatron's scaled init: each layer adds two projections to the residual stream, so shrinking
        them by sqrt(2 * layers) keeps the stream's variance from growing with depth."""
        scaled_std = self.config.initializer_range / math.sqrt(2.0 * self.config.num_hidden_layers)
        for layer in self.encoder.layers:
            nn.init.normal_(layer.attention.output.weight, mean=0.0, std=scaled_std)
            nn.init.normal_(layer.mlp.output.weight, mean=0.0, std=scaled_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked_lm_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.embeddings(input_ids, token_type_ids)
        # [B, S] of 1 (attend) / 0 (padding) -> [B, 1, 1, S] added to every head's scores.
        keep = attention_mask[:, None, None, :].to(hidden_states.dtype)
        additive_mask = (1.0 - keep) * MASKED_SCORE
        sequence_output = self.encoder(hidden_states, additive_mask)
        prediction_scores = self.mlm_head(sequence_output, masked_lm_positions)
        seq_relationship_score = self.nsp_head(self.pooler(sequence_output))
        return prediction_scores, seq_relationship_score


class BertPretrainingCriterion(nn.Module):
    """Sum of the masked-LM and next-sentence cross entropies, in fp32. Label -1 marks positions that do
    not count (NVIDIA's convention; Hugging Face uses -100). The MLM loss is the mean over the labelled
    tokens, so B×S logits with dense labels and B×P logits of the masked positions give the same value."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=-1)

    def forward(
        self,
        prediction_scores: torch.Tensor,
        seq_relationship_score: torch.Tensor,
        masked_lm_labels: torch.Tensor,
        next_sentence_labels: torch.Tensor,
    ) -> torch.Tensor:
        masked_lm_loss = self.loss_fn(
            prediction_scores.view(-1, self.vocab_size).float(), masked_lm_labels.view(-1)
        )
        next_sentence_loss = self.loss_fn(
            seq_relationship_score.view(-1, 2).float(), next_sentence_labels.view(-1)
        )
        return masked_lm_loss + next_sentence_loss


class BertForPreTrainingWithCriterion(BertForPreTraining):
    """Model and loss in one module, as in the RaNNC seed, so one capture covers both and the returned
    scalar is all that leaves the last pipeline stage.

    Called as `model(input_ids, token_type_ids, attention_mask, *labels)`. By default the MLM head runs on
    the masked positions only and `labels` are (masked_lm_positions, masked_lm_ids, next_sentence_labels):
    B×P positions and their original ids (P = max_predictions_per_seq), padding slots at position 0 with
    id -1, as `bert.data` yields them. With `full_sequence_mlm=True` (the seed's head, for comparisons) it
    scores every position and `labels` are (masked_lm_labels, next_sentence_labels), masked_lm_labels
    being B×S with -1 where nothing is masked. Both heads have the same parameters and the same loss."""

    LABELS = ("masked_lm_positions", "masked_lm_ids", "next_sentence_labels")
    FULL_SEQUENCE_LABELS = ("masked_lm_labels", "next_sentence_labels")

    def __init__(self, config: BertConfig, full_sequence_mlm: bool = False):
        super().__init__(config)
        self.full_sequence_mlm = full_sequence_mlm
        # The logits are over the padded vocab; NVIDIA pads config.vocab_size itself before this point.
        self.criterion = BertPretrainingCriterion(config.padded_vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *labels: torch.Tensor,
    ) -> torch.Tensor:
        expected = self.FULL_SEQUENCE_LABELS if self.full_sequence_mlm else self.LABELS
        if len(labels) != len(expected):
            raise TypeError(
                f"{type(self).__name__}(full_sequence_mlm={self.full_sequence_mlm}) takes input_ids, "
                f"token_type_ids, attention_mask, {', '.join(expected)}: {3 + len(expected)} tensors, got "
                f"{3 + len(labels)} (the default head takes {', '.join(self.LABELS)}; full_sequence_mlm=True "
                f"takes the seed's dense {', '.join(self.FULL_SEQUENCE_LABELS)})"
            )
        if self.full_sequence_mlm:
            masked_lm_positions = None
            masked_lm_labels, next_sentence_labels = labels
        else:
            masked_lm_positions, masked_lm_ids, next_sentence_labels = labels
            # Position 0 is [CLS], never masked: a slot there is padding whatever its id (NVIDIA's shards
            # pad masked_lm_ids with 0, which would otherwise count as predictions of [PAD]).
            masked_lm_labels = masked_lm_ids.masked_fill(masked_lm_positions == 0, -1)
        prediction_scores, seq_relationship_score = super().forward(
            input_ids, token_type_ids, attention_mask, masked_lm_positions
        )
        return self.criterion(
            prediction_scores, seq_relationship_score, masked_lm_labels, next_sentence_labels
        )


def count_parameters(model: nn.Module) -> int:
    """Counts each parameter once, so the tied embedding/decoder weight is not counted twice."""
    return sum(parameter.numel() for parameter in model.parameters())
