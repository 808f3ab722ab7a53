"""Token data: Megatron indexed shards, the mixture manifest, the deterministic blend, packing into
seq_len + 1 windows (its shuffling tables in shared memory-mapped files), and the data-parallel loader
whose state is one counter."""
from .blend import Blend
from .train_samples import build_train_samples, valid_prefixes
from .indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from .loader import MicroBatchLoader
from .mixture import load_manifest, requested_epochs, resolve_weights, write_manifest
from .packing import PackedSource, SequentialWindows, default_index_dir
from .samples import BlendedSamples, format_epoch_table

__all__ = ["Blend", "BlendedSamples", "IndexedDataset", "IndexedDatasetWriter",
           "MicroBatchLoader", "PackedSource", "SequentialWindows", "build_train_samples", "default_index_dir",
           "format_epoch_table", "load_manifest", "requested_epochs", "resolve_weights", "token_dtype",
           "valid_prefixes", "write_manifest"]
