"""Filesystem helpers at the bottom of the package: atomic writes on any fsspec filesystem."""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import posixpath
import re
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from imgcurate.errors import ShardError

__all__ = [
    "atomic_open",
    "write_parquet",
    "temp_name",
    "open_input",
    "open_output",
    "files_in",
    "shard_order",
    "remove_temporaries",
    "remove_tree",
    "in_the_way",
    "folder_fs",
    "shard_tars",
    "shard_parquet",
    "within",
    "same_folder",
    "missing_folder",
    "task_url",
    "process_local",
    "check_reachable",
]


def temp_name(path: str) -> str:
    """A temporary name beside ``path`` that no other writer picks (``<path>.tmp-<random>``)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def task_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` (as ``url_to_fs`` gives it) in the form a task opens on any worker: an absolute local path, or the
    URL with its protocol. A worker of a running scheduler has its own working directory, so a relative local path
    handed to a task would name another folder there.
    """
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` keeps its files in the memory of the process that writes them (``memory://``): other processes,
    a cluster's workers among them, see none of them."""
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, MemoryFileSystem)


def _tasks_in_other_processes() -> bool:
    """Whether Dask runs tasks in processes other than this one: the ``processes`` scheduler, or a distributed client
    whose scheduler is not in this process (an ``inproc://`` address is ``LocalCluster(processes=False)``)."""
    import dask

    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("processes", "multiprocessing"):
        return True
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed, or no client: the threaded or synchronous scheduler
        return False
    if scheduler in ("threads", "threading", "sync", "synchronous", "single-threaded"):
        return False
    return not str(client.scheduler.address).startswith("inproc://")


def check_reachable(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Raises :class:`ValueError` when ``path`` is on a filesystem private to this process (:func:`process_local`)
    while Dask runs the tasks in other processes, which would find nothing there or write where no one reads."""
    if process_local(fs) and _tasks_in_other_processes():
        raise ValueError(f"{path}: this process's memory, which the worker processes of the Dask scheduler in use do "
                         "not share: use a filesystem they all reach, or a scheduler that runs tasks in this "
                         "process")  # fmt: skip


def folder_fs(path: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` for a folder the user named, its errors naming ``path``: an unknown protocol
    (``foo://``) or one whose package is not installed (``s3://`` without s3fs). An empty path is an error, not the
    current folder."""
    if not str(path).strip():
        raise ValueError('the path is empty: give the folder ("." for the current one)')
    try:
        return fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ValueError, ImportError) as err:
        raise ValueError(f"{path}: cannot open this location ({type(err).__name__}: {err})") from None


def shard_tars(fs: fsspec.AbstractFileSystem, root: str, path: str) -> list[str]:
    """The ``*.tar`` files directly in the folder ``root`` (``path`` as the user named it, for messages), sorted.

    Raises:
        FileNotFoundError: no such folder, or no tar in it.
        NotADirectoryError: ``path`` is a file.
    """
    tars = files_in(fs, root, "*.tar")
    if not tars:
        if not fs.exists(root):
            raise FileNotFoundError(f"{path}: no such folder")
        if fs.isfile(root):
            raise NotADirectoryError(f"{path}: a file, not a folder of .tar shards")
        hint = ""
        if files_in(fs, root, "*.parquet"):
            hint = " (it holds .parquet files but no tars: imgcurate reads WebDataset shards, img2dataset's "
            hint += "output_format webdataset)"
        elif any(d.get("type") == "directory" for d in fs.ls(root, detail=True)):
            hint = " (it holds folders: `imgcurate shard FOLDER OUT` turns a folder of images into shards)"
        raise FileNotFoundError(f"{path}: no .tar shards in this folder{hint}")
    for tar in tars:
        if isinstance(fs, LocalFileSystem) and not os.path.exists(tar):  # listed, yet not there: a broken link
            raise ShardError(tar, "a broken symbolic link: the file it points to is missing")
    stems = {posixpath.basename(t)[: -len(".tar")] for t in tars}
    for parquet in files_in(fs, root, "*.parquet"):
        stem = posixpath.basename(parquet)[: -len(".parquet")]
        if stem in stems:
            continue
        if shard_parquet(stem, stems):  # a shard's metadata: its shard would be left out without a word
            raise ShardError(task_url(fs, parquet), f"has no {stem}.tar beside it (no such regular file): the "
                                                    "shard's tar is missing; restore it, or remove the parquet to "
                                                    "leave the shard out")  # fmt: skip
        warnings.warn(f"{task_url(fs, parquet)}: no {stem}.tar beside it; not read as a shard", stacklevel=3)
    for stats in files_in(fs, root, "*_stats.json"):  # img2dataset writes one per shard it wrote, tar and parquet
        stem = posixpath.basename(stats)[: -len("_stats.json")]
        if stem.isdigit() and stem not in stems:
            raise ShardError(task_url(fs, stats), f"img2dataset's statistics of a shard whose {stem}.tar is missing "
                                                  "(no such regular file): restore the tar, or remove the statistics "
                                                  "file to leave the shard out")  # fmt: skip
    return tars


def shard_parquet(stem: str, tar_stems: set[str]) -> bool:
    """Whether the parquet ``<stem>.parquet`` in a shard folder is a shard's metadata: beside a tar of that name, or
    named like a shard (digits, as img2dataset and imgcurate name them) whose tar is missing. Another parquet there
    (a user's own table) is no shard's."""
    return stem in tar_stems or stem.isdigit()


def in_the_way(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str] | None:
    """What keeps the folder ``path`` from being made on ``fs``, as (its path, what it is): ``path`` itself or, on the
    local filesystem, its nearest existing parent, when that is a file or a broken symbolic link; None when the folder
    is there or can be made. On object stores a key and a prefix of the same name live side by side, so only
    ``path`` itself is looked at there."""
    path = path.rstrip("/")
    if not isinstance(fs, LocalFileSystem):
        return (path, "a file") if fs.isfile(path) else None
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        if not parent or parent == path:
            return None
        path = parent
    if os.path.islink(path) and not os.path.exists(path):
        return path, "a broken symbolic link"
    return (path, "a file") if os.path.exists(path) and not os.path.isdir(path) else None


def file_stamp(fs: fsspec.AbstractFileSystem, info: dict) -> str:
    """What tells a file's versions apart without reading it, from its fsspec ``info``: its size and modification
    time, and the ETag on object stores (whose times have whole seconds). A local symbolic link is stamped with its
    target's size and time, as it is read as its target."""
    size = info.get("size")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    if info.get("islink") and isinstance(fs, LocalFileSystem):
        try:
            target = os.stat(info["name"])  # follows the link
            size, stamp = target.st_size, target.st_mtime
        except OSError:  # a broken link: opening the dataset names it
            pass
    if info.get("ETag") and info.get("LastModified"):
        stamp = f"{stamp}\0{info['ETag']}"
    return f"{size}\0{stamp}"


#: The glob of :func:`temp_name`'s suffix: ``.tmp-`` and 12 hex digits, so that a user's ``notes.tmp-v2`` is not one.
_TEMP_SUFFIX = ".tmp-" + "[0-9a-f]" * 12


def remove_temporaries(fs: fsspec.AbstractFileSystem, folder: str, of: str | None = None) -> None:
    """Removes the temporary files (:func:`temp_name`'s ``<name>.tmp-<12 hex digits>``) that writers killed before
    their rename left directly in ``folder``; with ``of``, only those of that file name (in a folder others write to
    as well)."""
    for stale in files_in(fs, folder, ("*" if of is None else glob.escape(of)) + _TEMP_SUFFIX):
        fs.rm(stale)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Removes ``path`` and all under it, if there is anything: on an object store a folder with no object in it
    does not exist, and removing it would raise."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def files_in(fs: fsspec.AbstractFileSystem, folder: str, *patterns: str) -> list[str]:
    """The files directly inside ``folder`` whose names match one of the glob ``patterns`` (``"*.tar"``), sorted
    with runs of digits compared as numbers (shard ``100000`` after ``99999``); none when the folder does not exist.

    The folder's own path is taken literally: ``fs.glob`` would read ``[``, ``]``, ``?`` and ``*`` in it as patterns,
    and so list a sibling folder's files (``data?x`` matching ``dataAx``) or none of its own (``data[2024]``).
    """
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        if path == folder.rstrip("/"):  # ``folder`` is a file: ls lists the file itself
            continue
        name = posixpath.basename(path)
        if _a_file(fs, entry) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            found.append(entry["name"])
    return sorted(found, key=shard_order)


def shard_order(path: str) -> tuple[list[str | int], str]:
    """The sort key of shard files: runs of digits compared as numbers (``99999.tar`` before ``100000.tar``: shard
    numbers grow past five digits), then the name itself (``01.tar`` before ``1.tar``, whatever the listing's order).
    The same order as plain sorting for zero-padded names of one width."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", path))], path


def _a_file(fs: fsspec.AbstractFileSystem, entry: dict) -> bool:
    """Whether a listing's entry is a file. fsspec's local listing gives a symbolic link the type ``other`` whatever
    it points at: a link to a file counts as the file (as every reader opens it), and so does a broken link, so that
    opening it names it rather than leaving it out without a word."""
    if entry.get("type") == "file":
        return True
    if not (entry.get("islink") and isinstance(fs, LocalFileSystem)):
        return False
    target = os.path.realpath(entry["name"])
    return os.path.isfile(target) or not os.path.exists(target)


def same_folder(fs: fsspec.AbstractFileSystem, a: str, b: str) -> bool:
    """Whether two folder paths on ``fs`` name one folder: equal once normalised, or on the local filesystem the
    same folder after following symbolic links."""
    if posixpath.normpath(a) == posixpath.normpath(b):
        return True
    return isinstance(fs, LocalFileSystem) and os.path.realpath(a) == os.path.realpath(b)


def within(fs: fsspec.AbstractFileSystem, path: str, folder: str) -> bool:
    """Whether ``path`` on ``fs`` is the folder ``folder`` or lies anywhere inside it: once normalised, or on the
    local filesystem also after following symbolic links."""

    def inside(p: str, f: str) -> bool:
        p, f = posixpath.normpath(p), posixpath.normpath(f).rstrip("/")
        return p == f or p.startswith(f + "/")

    if inside(path, folder):
        return True
    return isinstance(fs, LocalFileSystem) and inside(os.path.realpath(path), os.path.realpath(folder))


def open_input(path: str, storage_options: dict | None = None, buffering: int = -1) -> IO[bytes]:
    """Opens a file for reading in binary mode: a local path as a plain buffered file, anything else with fsspec.

    Local files skip fsspec's wrapper, which adds a Python call to every read, seek and tell of a tar read header
    by header. ``buffering`` (local files only) is the buffer size: the default (8 KiB) for readers that skip large
    members and read little more than their headers; large for readers of most of the bytes, whose every system call
    also gives up Python's GIL, which other threads then hold for up to its switch interval (5 ms).
    """
    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return open(fs_path, "rb", buffering=buffering)  # noqa: SIM115 - the caller closes it
    return fs.open(fs_path, "rb")


def open_output(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """Opens ``path`` on ``fs`` for writing in binary mode; a local file as a plain file with a 1 MiB buffer, so that
    a tar written member by member costs few system calls."""
    if isinstance(fs, LocalFileSystem):
        if fs.auto_mkdir:
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - the caller closes it
    return fs.open(path, "wb")


def missing_folder(path: str, storage_options: dict | None = None) -> str | None:
    """The folder that would hold the file ``path`` when it is not there, on a filesystem whose folders must exist
    before a file is written into them (the local one, unless fsspec creates them); None otherwise. Object stores
    have no folders to be missing."""
    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not isinstance(fs, LocalFileSystem) or fs.auto_mkdir:
        return None
    parent = os.path.dirname(fs_path)
    return None if os.path.isdir(parent) else parent


@contextmanager
def atomic_open(path: str, mode: str = "wb", storage_options: dict | None = None) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` and renames it to ``path`` only when the block succeeds.

    Raises:
        OSError: the temporary file cannot be made (no such folder, a file where the folder should be, no
            permission); of the same type as the filesystem's error, its message naming ``path`` and the problem,
            never the temporary name.
    """
    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if process_local(fs) or isinstance(fs, LocalFileSystem):  # the rename would move the file into a folder there
        if fs.isdir(fs_path):
            raise IsADirectoryError(errno.EISDIR, f"{path}: cannot write it: it is a folder")
    tmp = temp_name(fs_path)
    try:
        handle = fs.open(tmp, mode)
    except OSError as err:
        folder = posixpath.dirname(path.rstrip("/")) or "."
        parent = posixpath.dirname(fs_path)
        if isinstance(err, FileNotFoundError | NotADirectoryError) and fs.isfile(parent):
            problem = f"{folder} is a file, not a folder"
        elif isinstance(err, FileNotFoundError | NotADirectoryError) and not fs.isdir(parent):
            problem = f"the folder {folder} does not exist"
        elif isinstance(err, PermissionError):
            problem = f"no permission to write in {folder}"
        else:
            problem = err.strerror or type(err).__name__
        error = type(err)(f"{path}: cannot write it: {problem}")
        error.errno = err.errno
        raise error from None
    try:
        with handle as f:
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
