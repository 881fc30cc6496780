"""Index files for DALI's webdataset reader: where each member of a tar shard starts, so DALI need not scan the tar.

The format (``v1.2``) is the one DALI's ``wds2idx`` writes: a first line ``v1.2 <samples>``, then one line per
sample listing each of its members as ``<ext> <data offset> <size> <member name>``. Members are grouped into samples
as the tar reader groups them: consecutive members whose names share the part before the first dot of the file name.
``ShardWriter(..., index=True)`` writes the index while it writes the tar; :func:`write_index` makes one for a tar
that exists already.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Sequence

import fsspec

from imgcurate import progress
from imgcurate.errors import ShardError
from imgcurate.io._fs import atomic_open
from imgcurate.io.tar import check_end, split_member_name, unreadable_tar

__all__ = [
    "INDEX_VERSION",
    "IndexEntry",
    "index_path_for",
    "format_index",
    "save_index",
    "write_index",
    "write_indexes",
]

INDEX_VERSION = "v1.2"

#: (extension, offset of the member's data in the tar, size in bytes, member name)
IndexEntry = tuple[str, int, int, str]


def index_path_for(tar: str) -> str:
    """Where the index of ``tar`` lives: beside it, ``.idx`` instead of ``.tar``."""
    return (tar[:-4] if tar.endswith(".tar") else tar) + ".idx"


def format_index(tar: str, entries: Iterable[IndexEntry]) -> str:
    """The index text for the regular-file members of ``tar``, in tar order.

    Raises:
        ShardError: a member name holds white space (the format separates fields by spaces), or there is no member.
    """
    samples: list[list[IndexEntry]] = []
    last = None
    for entry in entries:
        name = entry[3]
        if any(c.isspace() for c in name):
            raise ShardError(tar, f"member {name!r} has white space in its name, which a DALI index cannot hold")
        key = split_member_name(name)[0]
        if key is None:  # hidden files (``._x.jpg``) and names without a key: wds2idx skips them too
            continue
        if not entry[0]:  # a member named ``key.`` has no extension: DALI reads an empty field as a broken index
            continue
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(entry)
    if not samples:
        raise ShardError(tar, "an empty tar has no DALI index")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def _entries(tar: str, storage_options: dict | None) -> list[IndexEntry]:
    """The regular-file members of ``tar``, read from its headers; a tar that is damaged before its end-of-archive
    blocks is an error (``tarfile`` stops at a bad header without one), not an index of its first members."""
    entries = []
    try:
        opened = fsspec.open(tar, "rb", **(storage_options or {})).open()
    except OSError as err:  # a broken symbolic link, no permission: named, and the other shards still indexed
        raise ShardError(tar, f"cannot be read ({err.strerror or type(err).__name__})") from None
    with opened as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as archive:
                for info in archive:
                    if info.isfile():
                        entries.append(
                            (split_member_name(info.name, lower=False)[1], info.offset_data, info.size, info.name)
                        )
                end = archive.offset
        except tarfile.TarError as err:
            raise ShardError(tar, unreadable_tar(f, err)) from None
        check_end(tar, f, end, len({split_member_name(name)[0] for *_, name in entries}))
    return entries


def write_index(tar: str, storage_options: dict | None = None) -> str:
    """Writes the DALI index of an existing ``tar`` beside it (atomically), reading only the tar's headers.

    Returns:
        The index path.
    """
    return _write(tar, _entries(tar, storage_options), storage_options)


def write_indexes(
    tars: Sequence[str],
    storage_options: dict | None = None,
    overwrite: bool = False,
    errors: list[ShardError] | None = None,
) -> list[str]:
    """Writes the DALI index of each tar that has none (or of every tar with ``overwrite``); skips empty tars.

    Args:
        tars: the shards.
        storage_options: for fsspec.
        overwrite: index every tar again, even those that have an index.
        errors: when given, a shard that cannot be indexed (unreadable tar, a member name with white space) is
            appended here as its :class:`ShardError` and the other shards are still indexed; else the first such
            error is raised (the indexes written before it stay).

    Returns:
        The index paths written.

    Raises:
        ShardError: a tar cannot be indexed, when ``errors`` is None.
    """
    written = []
    for tar in progress.bar(tars, desc="writing DALI indexes", unit="shard"):
        fs = fsspec.core.url_to_fs(tar, **(storage_options or {}))[0]
        if not overwrite and fs.exists(index_path_for(tar)):
            continue
        try:
            entries = _entries(tar, storage_options)
            if entries:
                written.append(_write(tar, entries, storage_options))
        except ShardError as err:
            if errors is None:
                raise
            errors.append(err)
    return written


def _write(tar: str, entries: list[IndexEntry], storage_options: dict | None) -> str:
    return save_index(tar, format_index(tar, entries), storage_options)


def save_index(tar: str, text: str, storage_options: dict | None = None) -> str:
    """Writes index ``text`` (from :func:`format_index`) beside ``tar``, atomically; returns its path."""
    path = index_path_for(tar)
    with atomic_open(path, "wb", storage_options) as f:
        f.write(text.encode("utf-8"))
    return path
