"""Filesystem helpers at the bottom of the package: atomic writes on any fsspec filesystem."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["atomic_open", "write_parquet", "temp_name"]


def temp_name(path: str) -> str:
    """A temporary name beside ``path`` that no other writer picks (``<path>.tmp-<random>``)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_open(path: str, mode: str = "wb", storage_options: dict | None = None) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` and renames it to ``path`` only when the block succeeds."""
    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tmp = temp_name(fs_path)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, fs_path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_parquet(table: pa.Table, path: str, storage_options: dict | None = None) -> None:
    """Writes a table to parquet atomically (temporary name, then rename)."""
    with atomic_open(path, "wb", storage_options) as f:
        pq.write_table(table, f)
