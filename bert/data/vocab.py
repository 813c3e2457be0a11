"""WordPiece vocabulary: train one with `tokenizers` (or take a user's vocab.txt) and tokenize documents.

`Vocab` carries what instance creation needs from a vocab.txt: special ids and which pieces continue a word.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
VOCAB_FILE_NAME = "vocab.txt"


@dataclass(frozen=True)
class Vocab:
    """The tokens of a vocab.txt in id order (line i holds the token of id i)."""

    tokens: tuple[str, ...]

    @classmethod
    def from_file(cls, vocab_file: Path) -> Vocab:
        lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        vocab = cls(tuple(line.rstrip("\r") for line in lines))
        missing = [t for t in SPECIAL_TOKENS if t not in vocab.ids]
        if missing:
            raise ValueError(f"{vocab_file} lacks the special tokens {missing}; BERT pretraining needs all of "
                             f"{list(SPECIAL_TOKENS)}.")
        return vocab

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    @property
    def pad_id(self) -> int:
        return self.ids[PAD]

    @property
    def cls_id(self) -> int:
        return self.ids[CLS]

    @property
    def sep_id(self) -> int:
        return self.ids[SEP]

    @property
    def mask_id(self) -> int:
        return self.ids[MASK]

    @cached_property
    def is_continuation(self) -> np.ndarray:
        """Bool per id: True for '##' pieces, which whole-word masking joins to the word they continue."""
        return np.array([t.startswith(CONTINUATION_PREFIX) for t in self.tokens], dtype=bool)

    @cached_property
    def replacement_ids(self) -> tuple[int, ...]:
        """Ids a masked token may be swapped for: every non-special token, so a random swap never fakes
        padding, a segment boundary or a [MASK]."""
        special = {self.ids[t] for t in SPECIAL_TOKENS}
        return tuple(i for i in range(len(self.tokens)) if i not in special)


def train_vocab(sentences: Sequence[str], output_dir: Path, vocab_size: int = 8192,
                lowercase: bool = True) -> Path:
    """Train a WordPiece vocab on the sentences and save it as output_dir/vocab.txt.

    tokenizers 0.23 numbers the '##' pieces of single characters in hash-map order, and those ids break
    ties between merges, so the vocab changes from run to run (huggingface/tokenizers#1794). Declaring
    every '##c' up front, in sorted order, makes training deterministic, which identical shards need.
    """
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=lowercase)
    continuation_pieces = _single_character_pieces(tokenizer, sentences)
    tokenizer.train_from_iterator(
        sentences,
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *continuation_pieces],
        wordpieces_prefix=CONTINUATION_PREFIX,
        show_progress=False,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # save_model does not create it
    tokenizer.save_model(str(output_dir))
    return output_dir / VOCAB_FILE_NAME


def _single_character_pieces(tokenizer, sentences: Iterable[str]) -> list[str]:
    normalizer = tokenizer._tokenizer.normalizer
    characters = set()
    for sentence in sentences:
        characters.update(normalizer.normalize_str(sentence))
    # Whitespace and punctuation never sit inside a word after BERT pre-tokenization.
    inner = (c for c in characters if not c.isspace() and not _is_punctuation(c))
    return [CONTINUATION_PREFIX + c for c in sorted(inner)]


def _is_punctuation(char: str) -> bool:
    # BERT counts all non-alphanumeric ASCII as punctuation, plus Unicode's P* categories.
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def load_tokenizer(vocab_file: Path, lowercase: bool = True):
    """The fast WordPiece tokenizer for a vocab.txt (tokenizers only: no transformers needed)."""
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase)


def tokenize_documents(tokenizer, documents: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Token ids per sentence per document; sentences that tokenize to nothing are dropped."""
    flat = [sentence for document in documents for sentence in document]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False)
    tokenized: list[list[list[int]]] = []
    position = 0
    for document in documents:
        ids = [encodings[position + i].ids for i in range(len(document))]
        position += len(document)
        tokenized.append([sentence for sentence in ids if sentence])
    return tokenized
