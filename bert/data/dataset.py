"""Loader for the HDF5 shards: samples in NVIDIA's training form, and seeded, resumable, rank-split batches
streamed from disk in memory bounded by a window of samples, whatever the size of the shards.

Every global batch is one slice of a per-epoch order of all samples; rank r takes rows r*b..(r+1)*b-1.
Samples carry the MLM targets the model's head needs: the masked positions and their ids (B x
max_predictions_per_seq, the default head), or dense B x S labels (`full_sequence_mlm`, the seed's head).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

SHARD_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
              "next_sentence_labels")
IGNORE_INDEX = -1  # NVIDIA's CrossEntropyLoss(ignore_index=-1) for unmasked positions and padding slots
UNCHUNKED_BLOCK_ROWS = 1024  # block size for a contiguous dataset, where any slice is read without waste
WINDOW_ROWS = 8192  # samples decoded at once by default: ~7.6 MB at sequence length 128
# Per-dataset HDF5 chunk cache. Blocks are read whole, so a cache saves nothing, while HDF5's default (1 MiB
# per dataset, kept while the file is open) would cost ~0.6 MB per open shard: GBs over thousands of shards.
CHUNK_CACHE_BYTES = 0

Rows = dict[str, np.ndarray]  # SHARD_KEYS -> [N, ...] arrays in the shards' own dtypes


def shard_files(input_dir: str | Path, split: str = "training") -> list[Path]:
    """The .hdf5 files of a folder whose names contain `split` ("training" or "test"), sorted."""
    files = sorted(p for p in Path(input_dir).iterdir() if p.is_file() and split in p.name
                   and p.suffix in (".hdf5", ".h5"))
    if not files:
        raise FileNotFoundError(f"No .hdf5 files with '{split}' in the name in {input_dir}; "
                                f"make some with `python -m bert.data.prepare --output_dir {input_dir}`.")
    return files


@dataclass(frozen=True)
class ShardLayout:
    """What the loader needs to know of a shard before reading it: its length, its block size (the rows of
    an input_ids chunk, the dataset holding most of the bytes), and each dataset's row shape and dtype."""

    num_rows: int
    block_rows: int
    row_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]


def read_layout(path: Path) -> ShardLayout:
    with h5py.File(path, "r") as f:
        missing = [key for key in SHARD_KEYS if key not in f]
        if missing:
            raise ValueError(f"{path} lacks the datasets {missing}; write shards with bert.data.prepare "
                             f"(NVIDIA's layout)")
        chunks = f["input_ids"].chunks
        return ShardLayout(num_rows=f["next_sentence_labels"].shape[0],
                           block_rows=chunks[0] if chunks else UNCHUNKED_BLOCK_ROWS,
                           row_shapes={key: f[key].shape[1:] for key in SHARD_KEYS},
                           dtypes={key: f[key].dtype for key in SHARD_KEYS})


class PretrainingDataset:
    """All samples of a list of shards as one index space, read from disk in blocks.

    A block is a run of rows of one shard aligned to the shard's chunks along the sample axis: reading it
    decompresses each chunk it touches once and keeps every row, whereas single random rows of a gzip
    dataset cost a chunk decompression each. Nothing is kept between reads, so memory is what the caller
    asks for; `ShardedBatchLoader` asks for a window of blocks at a time.

    A sample is [input_ids, segment_ids, input_mask, masked_lm_positions, masked_lm_ids,
    next_sentence_labels] (`masked_lm_slots`), or with `full_sequence_mlm` [input_ids, segment_ids,
    input_mask, masked_lm_labels, next_sentence_labels] (`masked_lm_labels`), the seed's form.

    One read-only file handle per shard is opened on first use and kept (a few kB each, the chunk cache
    being off); a process forked after opening some reopens its own, since HDF5 handles must not cross a fork.
    """

    def __init__(self, files: list[str | Path], full_sequence_mlm: bool = False):
        self.files = [Path(f) for f in files]
        self.full_sequence_mlm = full_sequence_mlm
        layouts = [read_layout(path) for path in self.files]
        self.row_shapes = agreed_row_shapes(self.files, layouts)
        self.dtypes = {key: np.result_type(*(layout.dtypes[key] for layout in layouts)) for key in SHARD_KEYS}
        self.offsets = np.concatenate([[0], np.cumsum([layout.num_rows for layout in layouts])]).astype(np.int64)
        self.block_starts, self.block_shards = block_table(self.offsets, [layout.block_rows for layout in layouts])
        self.block_rows = max(layout.block_rows for layout in layouts)  # of the largest blocks
        self._open: dict[int, dict[str, h5py.Dataset]] = {}  # shard -> its datasets, the file held open by them
        self._open_pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_blocks(self) -> int:
        return len(self.block_shards)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        """One sample, in the form the class docstring gives."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return [t[0] for t in self.batch(np.array([index]))]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Stacked samples for global indices, in their order; all int64 as NVIDIA's loader yields them."""
        return training_form(self.read_samples(indices), self.full_sequence_mlm)

    def read_samples(self, indices: np.ndarray) -> Rows:
        """Raw rows for global indices, in their order, reading each block they fall in once."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)}); got {indices.min()}..{indices.max()}")
        rows = self.empty_rows(len(indices))
        block_of = np.searchsorted(self.block_starts, indices, side="right") - 1
        for block in np.unique(block_of):
            selected = np.nonzero(block_of == block)[0]
            block_data = self.read_blocks(np.array([block]))
            for key, array in block_data.items():
                rows[key][selected] = array[indices[selected] - self.block_starts[block]]
        return rows

    def read_blocks(self, blocks: np.ndarray) -> Rows:
        """The rows of these blocks, one after the other, read straight into one buffer per dataset."""
        sizes = self.block_starts[blocks + 1] - self.block_starts[blocks]
        rows = self.empty_rows(int(sizes.sum()))
        destination = 0
        for block, size in zip(blocks.tolist(), sizes.tolist()):
            shard = int(self.block_shards[block])
            first = int(self.block_starts[block] - self.offsets[shard])
            datasets = self._datasets(shard)
            for key, buffer in rows.items():
                datasets[key].read_direct(buffer, np.s_[first : first + size],
                                          np.s_[destination : destination + size])
            destination += size
        return rows

    def empty_rows(self, count: int) -> Rows:
        return {key: np.empty((count, *self.row_shapes[key]), self.dtypes[key]) for key in SHARD_KEYS}

    def close(self) -> None:
        """Close the open shards now rather than when the dataset is collected; a later read reopens them."""
        for datasets in self._open.values():
            datasets["input_ids"].file.close()
        self._open = {}

    def __getstate__(self) -> dict:
        # Pickled for a worker process (spawn): handles do not travel; the worker opens its own.
        return {**self.__dict__, "_open": {}}

    def _datasets(self, shard: int) -> dict[str, h5py.Dataset]:
        """The shard's open datasets; kept, since looking a dataset up costs more than reading a small block."""
        if self._open_pid != os.getpid():
            # Forked: the parent's handles close as they drop here, and this process opens its own.
            self._open, self._open_pid = {}, os.getpid()
        if shard not in self._open:
            f = h5py.File(self.files[shard], "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            self._open[shard] = {key: f[key] for key in SHARD_KEYS}
        return self._open[shard]


def agreed_row_shapes(files: list[Path], layouts: list[ShardLayout]) -> dict[str, tuple[int, ...]]:
    """The one row shape per dataset that every shard has (samples of one batch must stack)."""
    shapes = {key: {layout.row_shapes[key] for layout in layouts} for key in SHARD_KEYS}
    differing = {key: sorted(found) for key, found in shapes.items() if len(found) > 1}
    if differing:
        raise ValueError(f"the shards {[f.name for f in files]} differ in sample shape {differing}; load shards "
                         f"of one max_seq_length and max_predictions_per_seq together")
    return {key: found.pop() for key, found in shapes.items()}


def block_table(offsets: np.ndarray, block_rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(first global index of every block plus the total at the end, shard of every block). Blocks cut each
    shard at multiples of its block_rows; a shard's last block may be shorter."""
    starts, shards = [], []
    for shard, rows in enumerate(block_rows):
        shard_starts = np.arange(offsets[shard], offsets[shard + 1], rows, dtype=np.int64)
        starts.append(shard_starts)
        shards.append(np.full(len(shard_starts), shard, dtype=np.int64))
    return np.concatenate([*starts, offsets[-1:]]), np.concatenate(shards)


def training_form(rows: Rows, full_sequence_mlm: bool) -> tuple[torch.Tensor, ...]:
    """The tensors the model takes, int64, from raw rows: see `PretrainingDataset`."""
    if full_sequence_mlm:
        targets = (masked_lm_labels(rows["masked_lm_positions"], rows["masked_lm_ids"],
                                    rows["input_ids"].shape[1]),)
    else:
        targets = masked_lm_slots(rows["masked_lm_positions"], rows["masked_lm_ids"])
    return tuple(torch.from_numpy(a.astype(np.int64, copy=False))
                 for a in (rows["input_ids"], rows["segment_ids"], rows["input_mask"], *targets,
                           rows["next_sentence_labels"]))


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


# Seed-sequence tags, so the block order and each window's shuffle draw from unrelated streams.
_BLOCK_ORDER, _WINDOW_SHUFFLE = 1, 2


class EpochOrder:
    """One epoch's order of all samples, held as a permutation of blocks rather than of samples.

    The blocks of all shards are permuted from (seed, epoch); consecutive runs of `window_blocks` of them
    form windows, and the samples of window w are shuffled from (seed, epoch, w). The epoch's order is
    the windows' shuffled samples one after the other. Each sample comes once; a batch mixes samples of up
    to window_blocks places in the shards (the writer shuffles instances before writing a shard, so the
    rows of one block are already a random draw from their shard). Memory is O(blocks), not O(samples).
    """

    def __init__(self, dataset: PretrainingDataset, seed: int, epoch: int, window_blocks: int):
        self.seed, self.epoch = seed, epoch
        rng = np.random.default_rng(np.random.SeedSequence([_BLOCK_ORDER, seed, epoch]))
        self.block_order = rng.permutation(dataset.num_blocks)
        self.window_blocks = window_blocks
        block_sizes = np.diff(dataset.block_starts)[self.block_order]
        # Epoch positions where each window starts, and the end of the epoch.
        self.window_starts = np.concatenate([[0], np.cumsum(block_sizes)])[::window_blocks]
        if self.window_starts[-1] != len(dataset):
            self.window_starts = np.append(self.window_starts, len(dataset))

    def windows_overlapping(self, start: int, stop: int) -> range:
        """The windows holding epoch positions start..stop-1."""
        first = int(np.searchsorted(self.window_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.window_starts, stop - 1, side="right")) - 1
        return range(first, last + 1)

    def blocks_of(self, window: int) -> np.ndarray:
        return self.block_order[window * self.window_blocks : (window + 1) * self.window_blocks]

    def shuffle_of(self, window: int, size: int) -> np.ndarray:
        """Window position -> row of the window's blocks, as read in block order."""
        rng = np.random.default_rng(np.random.SeedSequence([_WINDOW_SHUFFLE, self.seed, self.epoch, window]))
        return rng.permutation(size)


@dataclass
class Window:
    """A window's samples as read (rows) and the order they are served in (shuffle), from epoch position start."""

    start: int
    rows: Rows
    shuffle: np.ndarray

    def take(self, start: int, stop: int) -> Rows:
        """Epoch positions start..stop-1, clipped to this window."""
        picked = self.shuffle[max(start - self.start, 0) : stop - self.start]
        return {key: array[picked] for key, array in self.rows.items()}


class ShardedBatchLoader:
    """Endless local batches for one rank: (input_ids, segment_ids, input_mask, masked_lm_positions,
    masked_lm_ids, next_sentence_labels), or with `full_sequence_mlm` (input_ids, segment_ids, input_mask,
    masked_lm_labels, next_sentence_labels); int64 tensors of local_batch_size rows.

    Each epoch orders all training samples from (seed, epoch) (`EpochOrder`: shuffled blocks of rows,
    shuffled again within windows of about window_rows samples) and cuts the order into global batches of
    local_batch_size * world_size, dropping the tail. A rank decodes only the windows its rows fall in, one
    at a time, so memory stays near window_rows samples plus a batch whatever the shards' size. The state
    counts global batches, so resuming (even on another world size with the same global batch) continues
    the same sequence.
    """

    def __init__(self, input_dir: str | Path, local_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "training", full_sequence_mlm: bool = False,
                 window_rows: int = WINDOW_ROWS):
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
        # Whole blocks per window, as many of the largest as fit in window_rows (one if none fits).
        self.window_blocks = max(1, window_rows // self.dataset.block_rows)
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: EpochOrder | None = None
        self._windows: dict[int, Window] = {}  # of the current epoch: the one the next batch starts in

    def __iter__(self) -> ShardedBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        start = self.step_in_epoch * self.global_batch_size + self.rank * self.local_batch_size
        rows = self._epoch_positions(start, start + self.local_batch_size)
        # Advance before handing the batch out, so state_dict() taken now resumes at the next batch.
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return training_form(rows, self.dataset.full_sequence_mlm)

    def _epoch_positions(self, start: int, stop: int) -> Rows:
        order = self._epoch_order()
        parts = []
        for window in order.windows_overlapping(start, stop):
            # Windows before this one are done with for the epoch: drop them before reading this one, so
            # no more than one window is held even when a batch straddles two.
            self._windows = {w: kept for w, kept in self._windows.items() if w >= window}
            parts.append(self._window(order, window).take(start, stop))
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([part[key] for part in parts]) for key in SHARD_KEYS}

    def _epoch_order(self) -> EpochOrder:
        if self._order is None or self._order.epoch != self.epoch:
            self._order = EpochOrder(self.dataset, self.seed, self.epoch, self.window_blocks)
            self._windows = {}
        return self._order

    def _window(self, order: EpochOrder, window: int) -> Window:
        if window not in self._windows:
            rows = self.dataset.read_blocks(order.blocks_of(window))
            size = len(rows["next_sentence_labels"])
            self._windows[window] = Window(int(order.window_starts[window]), rows, order.shuffle_of(window, size))
        return self._windows[window]

    def close(self) -> None:
        """Drop the decoded window and close the shards (they reopen if iteration goes on)."""
        self._windows = {}
        self.dataset.close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_samples": len(self.dataset), "global_batch_size": self.global_batch_size,
                "num_blocks": self.dataset.num_blocks, "window_blocks": self.window_blocks}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken. It must come from the same data, seed, global batch size and
        shuffle blocks, or the batch sequence would silently change."""
        mine = self.state_dict()
        different = {k: (state[k], mine[k]) for k in ("seed", "num_samples", "global_batch_size")
                     if state[k] != mine[k]}
        if different:
            raise ValueError(f"loader state does not match this loader (saved, current): {different}; resume "
                             f"with the same shards, seed and local_batch_size * world_size.")
        self._check_blocks(state, mine)
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._order, self._windows = None, {}

    @staticmethod
    def _check_blocks(state: dict, mine: dict) -> None:
        if "num_blocks" not in state:
            warnings.warn("the loader state predates block-shuffled streaming (it holds no num_blocks); the rest of "
                          "its epoch follows the new order, so some samples of that epoch may repeat or be skipped",
                          stacklevel=3)
            return
        different = {k: (state[k], mine[k]) for k in ("num_blocks", "window_blocks") if state[k] != mine[k]}
        if different:
            raise ValueError(f"loader state was taken with other shuffle blocks (saved, current): {different}; "
                             f"resume with shards of the same chunking and the same window_rows.")
