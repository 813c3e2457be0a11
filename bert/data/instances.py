"""Pretraining instances from tokenized documents: Google's create_pretraining_data algorithm.

Sentence pairs for next-sentence prediction, packed to a target length, then masked for the MLM loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .vocab import Vocab

TokenizedDocument = Sequence[Sequence[int]]  # sentences of token ids


@dataclass(frozen=True)
class InstanceConfig:
    """Google's create_pretraining_data flags (dupe_factor as NVIDIA's bertPrep passes it)."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    whole_word_mask: bool = False


@dataclass(frozen=True)
class TrainingInstance:
    """[CLS] A [SEP] B [SEP] with masks applied; labels hold the original ids at the masked positions."""

    input_ids: list[int]
    segment_ids: list[int]
    masked_positions: list[int]
    masked_labels: list[int]
    is_random_next: bool


def create_instances(documents: Sequence[TokenizedDocument], vocab: Vocab, config: InstanceConfig,
                     rng: random.Random, on_document: Callable[[], None] | None = None) -> list[TrainingInstance]:
    """All instances of a set of documents: shuffled documents, `dupe_factor` passes with fresh masks,
    instances shuffled at the end. `on_document` is called once per document per pass (progress)."""
    documents = [list(doc) for doc in documents if doc]
    rng.shuffle(documents)
    instances: list[TrainingInstance] = []
    for _ in range(config.dupe_factor):
        for index in range(len(documents)):
            instances.extend(_instances_from_document(documents, index, vocab, config, rng))
            if on_document is not None:
                on_document()
    rng.shuffle(instances)
    return instances


def _instances_from_document(documents: list[list[Sequence[int]]], document_index: int, vocab: Vocab,
                             config: InstanceConfig, rng: random.Random) -> list[TrainingInstance]:
    document = documents[document_index]
    max_num_tokens = config.max_seq_length - 3  # room for [CLS], [SEP], [SEP]
    # Mostly fill the sequence; sometimes aim shorter so the model also sees short inputs.
    target_length = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)

    instances: list[TrainingInstance] = []
    chunk: list[Sequence[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            is_random_next = len(chunk) == 1 or rng.random() < 0.5
            if is_random_next:
                tokens_b = _random_continuation(documents, document_index, target_length - len(tokens_a), rng)
                i -= len(chunk) - a_end  # put the unused sentences back for the next chunk
            else:
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            input_ids = [vocab.cls_id, *tokens_a, vocab.sep_id, *tokens_b, vocab.sep_id]
            segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            input_ids, positions, labels = create_masked_lm_predictions(input_ids, vocab, config, rng)
            instances.append(TrainingInstance(input_ids, segment_ids, positions, labels, is_random_next))
            chunk = []
            chunk_length = 0
        i += 1
    return instances


def _random_continuation(documents: list[list[Sequence[int]]], document_index: int, target_length: int,
                         rng: random.Random) -> list[int]:
    # Ten tries at another document; a corpus of one document falls back to itself.
    for _ in range(10):
        other = rng.randint(0, len(documents) - 1)
        if other != document_index:
            break
    other_document = documents[other]
    tokens: list[int] = []
    for sentence in other_document[rng.randint(0, len(other_document) - 1):]:
        tokens.extend(sentence)
        if len(tokens) >= target_length:
            break
    return tokens


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """Trim the longer side, one token at a time from its front or back at random, until the pair fits.

    Random ends avoid a bias towards always keeping sentence starts."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_masked_lm_predictions(input_ids: list[int], vocab: Vocab, config: InstanceConfig,
                                 rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """Mask ~15% of the tokens: (masked input ids, sorted positions, original ids at those positions).

    A chosen token becomes [MASK] 80% of the time, stays 10% and turns into a random token 10%, so the
    model cannot rely on seeing [MASK]. With whole_word_mask, a word's '##' pieces are chosen together.
    """
    special = (vocab.cls_id, vocab.sep_id)
    candidates: list[list[int]] = []
    for i, token in enumerate(input_ids):
        if token in special:
            continue
        # A '##' piece joins the word before it, unless [CLS]/[SEP] stands in between (a truncated word).
        if config.whole_word_mask and vocab.is_continuation[token] and candidates and candidates[-1][-1] == i - 1:
            candidates[-1].append(i)
        else:
            candidates.append([i])
    rng.shuffle(candidates)

    count = min(config.max_predictions_per_seq, max(1, round(len(input_ids) * config.masked_lm_prob)))
    output = list(input_ids)
    positions: list[int] = []
    for word in candidates:
        if len(positions) >= count:
            break
        if len(positions) + len(word) > count:  # a whole word that no longer fits is skipped
            continue
        for i in word:
            if rng.random() < 0.8:
                output[i] = vocab.mask_id
            elif rng.random() < 0.5:
                pass  # keep the original token
            else:
                output[i] = vocab.replacement_ids[rng.randint(0, len(vocab.replacement_ids) - 1)]
            positions.append(i)
    positions.sort()
    return output, positions, [input_ids[i] for i in positions]
