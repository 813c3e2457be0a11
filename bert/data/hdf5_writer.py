"""HDF5 shard writer: pretraining instances in NVIDIA's exact layout, so their loader and ours both read them.

Six gzip datasets, zero padded: input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids
and next_sentence_labels (1 = random next sentence). Chunks hold whole rows, the same rows in every dataset,
so the loader reads a run of samples by decompressing each chunk once (dataset.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from .instances import TrainingInstance

SHARD_DTYPES = {
    "input_ids": np.int32,
    "input_mask": np.int8,
    "segment_ids": np.int8,
    "masked_lm_positions": np.int32,
    "masked_lm_ids": np.int32,
    "next_sentence_labels": np.int8,
}
# Uncompressed bytes of one input_ids chunk (1024 rows at sequence length 128). Bigger chunks compress a little
# better; smaller ones let the loader shuffle finer blocks of samples in the same memory.
CHUNK_BYTES = 512 * 1024


def row_shapes(max_seq_length: int, max_predictions_per_seq: int) -> dict[str, tuple[int, ...]]:
    """The shape of one sample in each dataset."""
    return {"input_ids": (max_seq_length,), "input_mask": (max_seq_length,), "segment_ids": (max_seq_length,),
            "masked_lm_positions": (max_predictions_per_seq,), "masked_lm_ids": (max_predictions_per_seq,),
            "next_sentence_labels": ()}


def chunk_rows(max_seq_length: int) -> int:
    """Samples per chunk: whole rows, CHUNK_BYTES of input_ids (the largest dataset)."""
    return max(1, CHUNK_BYTES // (max_seq_length * np.dtype(SHARD_DTYPES["input_ids"]).itemsize))


def create_shard_datasets(f: h5py.File, num_rows: int, max_seq_length: int, max_predictions_per_seq: int,
                          rows_per_chunk: int | None = None) -> dict[str, h5py.Dataset]:
    """The six empty datasets of a shard of num_rows samples, chunked by whole rows (rows_per_chunk, default
    `chunk_rows`), for callers that fill a shard piece by piece."""
    rows = min(rows_per_chunk or chunk_rows(max_seq_length), num_rows)
    datasets = {}
    for name, shape in row_shapes(max_seq_length, max_predictions_per_seq).items():
        # An empty dataset cannot take a chunk of whole rows (HDF5 wants chunk <= shape): h5py picks one.
        chunks = (rows, *shape) if rows > 0 else True
        datasets[name] = f.create_dataset(name, shape=(num_rows, *shape), dtype=SHARD_DTYPES[name], chunks=chunks,
                                          compression="gzip", track_times=False)
    return datasets


def instances_to_arrays(instances: Sequence[TrainingInstance], max_seq_length: int,
                        max_predictions_per_seq: int) -> dict[str, np.ndarray]:
    """Pack instances into NVIDIA's zero-padded arrays, keyed by dataset name."""
    shapes = row_shapes(max_seq_length, max_predictions_per_seq)
    arrays = {name: np.zeros((len(instances), *shape), SHARD_DTYPES[name]) for name, shape in shapes.items()}
    for row, instance in enumerate(instances):
        length = len(instance.input_ids)
        predictions = len(instance.masked_positions)
        if length > max_seq_length or predictions > max_predictions_per_seq:
            raise ValueError(f"instance {row} has {length} tokens / {predictions} predictions; the shard holds "
                             f"{max_seq_length} / {max_predictions_per_seq}")
        arrays["input_ids"][row, :length] = instance.input_ids
        arrays["input_mask"][row, :length] = 1
        arrays["segment_ids"][row, :length] = instance.segment_ids
        arrays["masked_lm_positions"][row, :predictions] = instance.masked_positions
        arrays["masked_lm_ids"][row, :predictions] = instance.masked_labels
        arrays["next_sentence_labels"][row] = instance.is_random_next
    return arrays


def write_shard(path: Path, instances: Sequence[TrainingInstance], max_seq_length: int,
                max_predictions_per_seq: int) -> int:
    """Write one shard and return its instance count.

    The file appears under its final name only when complete, so an interrupted run never leaves a
    truncated shard that a loader would pick up."""
    path = Path(path)
    arrays = instances_to_arrays(instances, max_seq_length, max_predictions_per_seq)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w", track_order=True) as f:
        datasets = create_shard_datasets(f, len(instances), max_seq_length, max_predictions_per_seq)
        for name, array in arrays.items():
            datasets[name][...] = array
    os.replace(partial, path)
    return len(instances)
