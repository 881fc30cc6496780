"""imgcurate: curate image-text datasets stored as WebDataset shards, with a Dask metadata frame."""

from __future__ import annotations

from imgcurate import config
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.errors import (
    AlignmentError,
    ClusterError,
    ConcurrentExportError,
    ConfigError,
    ImgcurateError,
    MissingDependencyError,
    ShardError,
)
from imgcurate.io.make import make_shards
from imgcurate.io.shards import new_key

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "ClusterError",
    "ConcurrentExportError",
    "ConfigError",
    "ImageTextPairDataset",
    "ImgcurateError",
    "MissingDependencyError",
    "ShardError",
    "__version__",
    "config",
    "make_shards",
    "new_key",
]
