"""HDF5 shard writer: pretraining instances in NVIDIA's exact layout, so their loader and ours both read them.

Six gzip datasets, zero padded: input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids
and next_sentence_labels (1 = random next sentence).
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


def instances_to_arrays(instances: Sequence[TrainingInstance], max_seq_length: int,
                        max_predictions_per_seq: int) -> dict[str, np.ndarray]:
    """Pack instances into NVIDIA's zero-padded arrays, keyed by dataset name."""
    n = len(instances)
    arrays = {
        "input_ids": np.zeros((n, max_seq_length), SHARD_DTYPES["input_ids"]),
        "input_mask": np.zeros((n, max_seq_length), SHARD_DTYPES["input_mask"]),
        "segment_ids": np.zeros((n, max_seq_length), SHARD_DTYPES["segment_ids"]),
        "masked_lm_positions": np.zeros((n, max_predictions_per_seq), SHARD_DTYPES["masked_lm_positions"]),
        "masked_lm_ids": np.zeros((n, max_predictions_per_seq), SHARD_DTYPES["masked_lm_ids"]),
        "next_sentence_labels": np.zeros((n,), SHARD_DTYPES["next_sentence_labels"]),
    }
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
        for name, array in arrays.items():
            f.create_dataset(name, data=array, dtype=array.dtype, compression="gzip", track_times=False)
    os.replace(partial, path)
    return len(instances)
