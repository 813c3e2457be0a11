"""Loader for the HDF5 shards: samples in NVIDIA's training form, and seeded, resumable, rank-split batches.

Every global batch is one slice of a per-epoch permutation of all samples; rank r takes rows r*b..(r+1)*b-1.
Samples carry the MLM targets the model's head needs: the masked positions and their ids (B x
max_predictions_per_seq, the default head), or dense B x S labels (`full_sequence_mlm`, the seed's head).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

SHARD_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
              "next_sentence_labels")
IGNORE_INDEX = -1  # NVIDIA's CrossEntropyLoss(ignore_index=-1) for unmasked positions and padding slots


def shard_files(input_dir: str | Path, split: str = "training") -> list[Path]:
    """The .hdf5 files of a folder whose names contain `split` ("training" or "test"), sorted."""
    files = sorted(p for p in Path(input_dir).iterdir() if p.is_file() and split in p.name
                   and p.suffix in (".hdf5", ".h5"))
    if not files:
        raise FileNotFoundError(f"No .hdf5 files with '{split}' in the name in {input_dir}; "
                                f"make some with `python -m bert.data.prepare --output_dir {input_dir}`.")
    return files


class PretrainingDataset:
    """All samples of a list of shards as one index space, read lazily.

    Only shard lengths are read up front; a shard's arrays are decompressed whole on its first use and
    kept, since random rows of a gzip dataset would cost a chunk decompression each.

    A sample is [input_ids, segment_ids, input_mask, masked_lm_positions, masked_lm_ids,
    next_sentence_labels] (`masked_lm_slots`), or with `full_sequence_mlm` [input_ids, segment_ids,
    input_mask, masked_lm_labels, next_sentence_labels] (`masked_lm_labels`), the seed's form.
    """

    def __init__(self, files: list[str | Path], full_sequence_mlm: bool = False):
        self.files = [Path(f) for f in files]
        self.full_sequence_mlm = full_sequence_mlm
        lengths = []
        for path in self.files:
            with h5py.File(path, "r") as f:
                lengths.append(f["next_sentence_labels"].shape[0])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        """One sample, in the form the class docstring gives."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return [t[0] for t in self.batch(np.array([index]))]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Stacked samples for global indices, in their order; all int64 as NVIDIA's loader yields them."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        data: dict[str, np.ndarray] = {}
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            local = indices[selected] - self.offsets[shard]
            for key, array in self._shard(int(shard)).items():
                if key not in data:
                    data[key] = np.empty((len(indices), *array.shape[1:]), dtype=np.int64)
                data[key][selected] = array[local]
        if self.full_sequence_mlm:
            targets = (masked_lm_labels(data["masked_lm_positions"], data["masked_lm_ids"],
                                        data["input_ids"].shape[1]),)
        else:
            targets = masked_lm_slots(data["masked_lm_positions"], data["masked_lm_ids"])
        return tuple(torch.from_numpy(a) for a in (data["input_ids"], data["segment_ids"], data["input_mask"],
                                                   *targets, data["next_sentence_labels"]))

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            with h5py.File(self.files[shard], "r") as f:
                self._shards[shard] = {key: f[key][:] for key in SHARD_KEYS}
        return self._shards[shard]


def real_predictions(positions: np.ndarray) -> np.ndarray:
    """[N, P] True for the slots that hold a prediction. Positions are read up to the first 0: position 0
    is [CLS], never masked, so 0 means padding (NVIDIA's shards pad both arrays with 0)."""
    return np.cumprod(positions != 0, axis=1).astype(bool)


def masked_lm_slots(positions: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masked head's fixed-shape [N, P] targets: the positions, 0 in padding slots (a valid index to
    gather, [CLS]), and the original ids, -1 (ignored by the loss) in padding slots."""
    valid = real_predictions(positions)
    return (np.where(valid, positions, 0).astype(np.int64),
            np.where(valid, ids, IGNORE_INDEX).astype(np.int64))


def masked_lm_labels(positions: np.ndarray, ids: np.ndarray, seq_length: int) -> np.ndarray:
    """Dense [N, S] labels (the full-sequence head's): -1 everywhere except the original ids at the masked
    positions."""
    labels = np.full((positions.shape[0], seq_length), IGNORE_INDEX, dtype=np.int64)
    valid = real_predictions(positions)
    rows = np.nonzero(valid)[0]
    labels[rows, positions[valid]] = ids[valid]
    return labels


class ShardedBatchLoader:
    """Endless local batches for one rank: (input_ids, segment_ids, input_mask, masked_lm_positions,
    masked_lm_ids, next_sentence_labels), or with `full_sequence_mlm` (input_ids, segment_ids, input_mask,
    masked_lm_labels, next_sentence_labels); int64 tensors of local_batch_size rows.

    Each epoch draws a permutation of all training samples from (seed, epoch) and cuts it into global
    batches of local_batch_size * world_size, dropping the tail. The state counts global batches, so
    resuming (even on another world size with the same global batch) continues the same sequence.
    """

    def __init__(self, input_dir: str | Path, local_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "training", full_sequence_mlm: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.dataset = PretrainingDataset(shard_files(input_dir, split), full_sequence_mlm)
        self.local_batch_size = local_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch_size = local_batch_size * world_size
        self.steps_per_epoch = len(self.dataset) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} samples in {input_dir} cannot fill one global batch of "
                             f"{self.global_batch_size}; lower the batch size or prepare more data.")
        self.epoch = 0
        self.step_in_epoch = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def __iter__(self) -> ShardedBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        start = self.step_in_epoch * self.global_batch_size + self.rank * self.local_batch_size
        indices = self._epoch_permutation()[start : start + self.local_batch_size]
        # Advance before handing the batch out, so state_dict() taken now resumes at the next batch.
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return self.dataset.batch(indices)

    def _epoch_permutation(self) -> np.ndarray:
        if self._permutation_epoch != self.epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            self._permutation = rng.permutation(len(self.dataset))
            self._permutation_epoch = self.epoch
        return self._permutation

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_samples": len(self.dataset), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken. It must come from the same data, seed and global batch size,
        or the batch sequence would silently change."""
        mine = self.state_dict()
        different = {k: (state[k], mine[k]) for k in ("seed", "num_samples", "global_batch_size")
                     if state[k] != mine[k]}
        if different:
            raise ValueError(f"loader state does not match this loader (saved, current): {different}; resume "
                             f"with the same shards, seed and local_batch_size * world_size.")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
