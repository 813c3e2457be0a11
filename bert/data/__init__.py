"""BERT pretraining data: raw text to NVIDIA-layout HDF5 shards (`prepare`), and a rank-aware loader (`dataset`).

corpus -> vocab -> instances -> hdf5_writer, driven by prepare; dataset reads the shards back.
"""

from .dataset import PretrainingDataset, ShardedBatchLoader, shard_files
from .prepare import prepare_default_data

__all__ = ["PretrainingDataset", "ShardedBatchLoader", "prepare_default_data", "shard_files"]
