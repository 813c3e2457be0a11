"""Memory and speed of the BERT loader (bert/data/dataset.py): peak RSS growth while it streams, and samples/s.

By default it writes one 2 GB shard (decompressed size) of random tokens in the writer's layout to a
temporary folder, streams one epoch of it and deletes it. The shard is written by a child process, so the
measuring process's heap starts clean.

    python benchmarks/loader_memory.py                                   # 2 GB shard in $TMPDIR, then removed
    python benchmarks/loader_memory.py --gigabytes 0.2 --dir /scratch    # smaller, kept (and reused) in /scratch
    python benchmarks/loader_memory.py --input_dir data/default --epochs 3   # the bundled corpus
    python benchmarks/loader_memory.py --input_dir data/default --epochs 3 --loader_source old_dataset.py

--loader_source takes another version of dataset.py (e.g. `git show REV:bert/data/dataset.py`) for before /
after figures. Peak RSS is the kernel's VmHWM, reset before the loader is built (Linux).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from bert.data.dataset import shard_files  # noqa: E402
from bert.data.hdf5_writer import SHARD_DTYPES, create_shard_datasets, row_shapes  # noqa: E402

VOCAB_SIZE = 30522
WRITE_SLICE_ROWS = 65536


def bytes_per_sample(seq: int, pred: int) -> int:
    """Decompressed bytes of one sample in the shard's dtypes: what an eager loader keeps per sample."""
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(SHARD_DTYPES[name]).itemsize
               for name, shape in row_shapes(seq, pred).items())


def random_samples(rng: np.random.Generator, count: int, seq: int, pred: int) -> dict[str, np.ndarray]:
    """Zero-padded samples of random length and tokens, 15% of positions (at most pred) marked as masked."""
    lengths = rng.integers(seq // 4, seq + 1, count)
    inside = np.arange(seq) < lengths[:, None]
    split = rng.integers(1, lengths)
    positions = np.sort(rng.integers(1, lengths[:, None] - 1, (count, pred)), axis=1)
    predicted = np.arange(pred) < np.minimum(pred, np.round(lengths * 0.15))[:, None]
    return {
        "input_ids": np.where(inside, rng.integers(5, VOCAB_SIZE, (count, seq)), 0).astype(np.int32),
        "input_mask": inside.astype(np.int8),
        "segment_ids": (inside & (np.arange(seq) >= split[:, None])).astype(np.int8),
        "masked_lm_positions": np.where(predicted, positions, 0).astype(np.int32),
        "masked_lm_ids": np.where(predicted, rng.integers(5, VOCAB_SIZE, (count, pred)), 0).astype(np.int32),
        "next_sentence_labels": rng.integers(0, 2, count).astype(np.int8),
    }


def write_random_shard(path: Path, num_samples: int, seq: int, pred: int) -> None:
    """A shard as bert.data.prepare lays it out (gzip, whole-row chunks), written slice by slice."""
    rng = np.random.default_rng(0)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w", track_order=True) as f:
        datasets = create_shard_datasets(f, num_samples, seq, pred)
        for start in range(0, num_samples, WRITE_SLICE_ROWS):
            stop = min(start + WRITE_SLICE_ROWS, num_samples)
            for name, array in random_samples(rng, stop - start, seq, pred).items():
                datasets[name][start:stop] = array
    partial.rename(path)


def decompressed_bytes(input_dir: Path) -> int:
    total = 0
    for path in shard_files(input_dir):
        with h5py.File(path, "r") as f:
            total += sum(f[name].nbytes for name in f)
    return total


def load_loader_class(source: str | None) -> type:
    if source is None:
        from bert.data.dataset import ShardedBatchLoader

        return ShardedBatchLoader
    spec = importlib.util.spec_from_file_location("loader_under_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ShardedBatchLoader


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def stream(loader, steps: int) -> list[list[float]]:
    """[batches, seconds] of each epoch (a partial last one as far as it ran) over `steps` batches."""
    epochs, started, epoch, batches = [], time.perf_counter(), loader.epoch, 0
    for _ in range(steps):
        next(loader)
        batches += 1
        if loader.epoch != epoch:
            epochs.append([batches, time.perf_counter() - started])
            started, epoch, batches = time.perf_counter(), loader.epoch, 0
    if batches:
        epochs.append([batches, time.perf_counter() - started])
    return epochs


def measure(input_dir: Path, args: argparse.Namespace) -> None:
    loader_class = load_loader_class(args.loader_source)
    gc.collect()
    baseline_kib = rss_kib("VmRSS")
    reset_peak_rss()
    loader = loader_class(input_dir, args.batch_size, seed=0)
    steps = args.steps or args.epochs * loader.steps_per_epoch
    started = time.perf_counter()
    next(loader)
    first_batch_s = time.perf_counter() - started
    first_growth_mib = (rss_kib("VmHWM") - baseline_kib) / 1024
    epochs = stream(loader, steps - 1)
    epochs[0] = [epochs[0][0] + 1, epochs[0][1] + first_batch_s] if epochs else [1, first_batch_s]
    peak_growth_mib = (rss_kib("VmHWM") - baseline_kib) / 1024
    print(f"loader: {args.loader_source or 'bert/data/dataset.py'}; {len(loader.dataset)} samples, "
          f"{decompressed_bytes(input_dir) / 2**20:.0f} MiB decompressed, in {input_dir}")
    print(f"peak RSS growth: {peak_growth_mib:.1f} MiB over the run, {first_growth_mib:.1f} MiB at the first batch")
    total_s = sum(seconds for _, seconds in epochs)
    rates = ", ".join(f"{args.batch_size * batches / seconds:,.0f}" for batches, seconds in epochs)
    print(f"samples/s: {args.batch_size * steps / total_s:,.0f} over {steps} batches of {args.batch_size} "
          f"({total_s:.1f} s); per epoch: {rates}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="decompressed size of the generated shard")
    parser.add_argument("--dir", default=None, help="where to write the shard and keep it (default: a temp dir, "
                        "removed at the end); a shard of the same size there is reused")
    parser.add_argument("--input_dir", default=None, help="stream these shards instead of generating one")
    parser.add_argument("--seq", type=int, default=128, help="max_seq_length of the generated shard")
    parser.add_argument("--pred", type=int, default=20, help="max_predictions_per_seq of the generated shard")
    parser.add_argument("--batch_size", type=int, default=256, help="local batch size")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="batches to read (0: --epochs epochs)")
    parser.add_argument("--loader_source", default=None, help="a dataset.py to take ShardedBatchLoader from")
    args = parser.parse_args(argv)

    if args.input_dir is not None:
        measure(Path(args.input_dir), args)
        return
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loader_memory_"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        num_samples = int(args.gigabytes * 1e9) // bytes_per_sample(args.seq, args.pred)
        path = folder / f"training_random_{num_samples}x{args.seq}.hdf5"
        if not path.exists():
            started = time.perf_counter()
            writer = multiprocessing.get_context("spawn").Process(
                target=write_random_shard, args=(path, num_samples, args.seq, args.pred))
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise SystemExit(f"writing {path} failed (exit code {writer.exitcode})")
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB on disk) in {time.perf_counter() - started:.0f} s")
        print(f"shard: {num_samples} samples, {num_samples * bytes_per_sample(args.seq, args.pred) / 1e9:.2f} GB "
              f"decompressed, {path.stat().st_size / 1e9:.2f} GB on disk")
        measure(folder, args)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
