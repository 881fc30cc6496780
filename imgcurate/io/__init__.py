"""Reading and writing WebDataset tar shards and their per-shard parquet files."""

from imgcurate.io.shards import ShardWriter, new_key, scan_shard
from imgcurate.io.tar import (
    IMAGE_EXTENSIONS,
    NO_SAMPLE,
    Sample,
    aligned_samples,
    iter_samples,
    read_keys,
    split_member_name,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "NO_SAMPLE",
    "Sample",
    "ShardWriter",
    "aligned_samples",
    "iter_samples",
    "new_key",
    "read_keys",
    "scan_shard",
    "split_member_name",
]
