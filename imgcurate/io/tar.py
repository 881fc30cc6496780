"""Reading WebDataset tar shards: members grouped into samples by key, streamed one sample at a time.

A member ``dir/abc.seg.png`` belongs to the sample with key ``dir/abc`` and has extension ``seg.png``: the key is the
member path up to the first dot of its file name, as WebDataset defines it. Members of one sample are contiguous in
the tar; a key that comes back after another key, or a member name seen twice, is a duplicate sample and an error.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO

import fsspec

from imgcurate.errors import AlignmentError, ShardError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def split_member_name(name: str) -> tuple[str, str]:
    """Splits a member path into ``(key, extension)``; the extension is ``""`` when the file name has no dot."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(folder, stem) if folder else stem
    return key, ext if dot else ""


def unsafe_member_name(name: str) -> bool:
    """True for absolute paths and paths that climb out of their folder (``/etc/x``, ``../x``, ``a/../../x``)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.replace("\\", "/").split("/")


@dataclasses.dataclass
class Sample:
    """One sample of a shard: its key and its members' bytes by extension, in tar order.

    Attributes:
        key: the sample key as stored in the tar.
        members: extension -> bytes, in the order the members appear in the tar. Empty when read with
            ``read_data=False``.
        sizes: extension -> size in bytes.
        errors: problems found with this sample (unsafe names, non-file members); the sample is still returned.
    """

    key: str
    members: dict[str, bytes] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def image_ext(self) -> str | None:
        """The extension of the sample's image member, or None when it has none."""
        for ext in self.sizes:
            if ext.lower() in IMAGE_EXTENSIONS:
                return ext
        return None

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return None if ext is None else self.members.get(ext)


def _open_tar(path: str, fileobj: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as err:
        raise ShardError(path, f"not a readable tar file ({err})") from None


def iter_samples(
    path: str,
    *,
    storage_options: dict | None = None,
    wanted: set[str] | None = None,
    exts: set[str] | None = None,
    read_data: bool = True,
) -> Iterator[Sample]:
    """Yields the samples of one tar shard in order, one at a time (memory holds one sample).

    Args:
        path: local path or fsspec URL of the tar.
        storage_options: passed to fsspec.
        wanted: if given, only these keys get their bytes read; other samples come back with sizes only
            (their data is skipped by seeking, not read).
        exts: if given, only members with these extensions get their bytes read.
        read_data: False reads headers only (all samples come back with sizes only).

    Raises:
        ShardError: the file is not a tar, is truncated, or holds the same key twice.
    """
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        tar = _open_tar(path, f)
        seen: set[str] = set()
        current: Sample | None = None
        try:
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError as err:
                    raise ShardError(path, f"truncated or corrupt tar after {len(seen)} samples ({err})") from None
                if info is None:
                    break
                tar.members.clear()  # tarfile keeps every header otherwise; we stream
                if info.isdir():
                    continue
                key, ext = split_member_name(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ShardError(path, f"duplicate sample key {key!r} (its members are not contiguous)")
                    seen.add(key)
                    current = Sample(key)
                if ext in current.sizes:
                    raise ShardError(path, f"duplicate member {info.name!r}: two samples share the key {key!r}")
                if unsafe_member_name(info.name):
                    current.errors.append(f"unsafe member name {info.name!r}")
                if not info.isfile():
                    current.errors.append(f"member {info.name!r} is not a regular file")
                    current.sizes[ext] = 0
                    current.members[ext] = b""
                    continue
                current.sizes[ext] = info.size
                if read_data and (wanted is None or key in wanted) and (exts is None or ext in exts):
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise ShardError(
                            path, f"truncated tar: member {info.name!r} has {len(data)} of {info.size} bytes"
                        )
                    current.members[ext] = data
            if current is not None:
                yield current
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(path, f"truncated or corrupt tar ({err})") from None
        finally:
            tar.close()


def read_keys(path: str, *, storage_options: dict | None = None) -> list[str]:
    """The sample keys of a tar shard, in order, reading headers only."""
    return [s.key for s in iter_samples(path, storage_options=storage_options, read_data=False)]


def aligned_images(
    tar: str, keys: list[str], storage_options: dict | None = None
) -> Iterator[tuple[bytes | None, str | None]]:
    """(image bytes or None, error or None) for each metadata key, in order, streamed from the tar.

    ``keys`` must be an in-order subsequence of the tar's keys (a row-filtered metadata partition is fine).

    Raises:
        AlignmentError: a key is not found at its place in the tar, naming the shard and the key.
    """
    if not keys:
        return
    pos = 0
    for sample in iter_samples(tar, storage_options=storage_options, wanted=set(keys)):
        if sample.key != keys[pos]:
            continue
        image = sample.image
        yield image, (None if image is not None else "sample has no image member")
        pos += 1
        if pos == len(keys):
            return
    raise _misaligned(tar, keys, pos)


def check_aligned(tar: str, keys: list[str], tar_keys: list[str]) -> None:
    """Raises :class:`AlignmentError` unless ``keys`` is an in-order subsequence of the tar's ``tar_keys``."""
    pos = 0
    for key in tar_keys:
        if pos < len(keys) and key == keys[pos]:
            pos += 1
    if pos < len(keys):
        raise _misaligned(tar, keys, pos)


def _misaligned(tar: str, keys: list[str], pos: int) -> AlignmentError:
    return AlignmentError(
        f"{tar}: the metadata has {len(keys)} rows but only {pos} of them were found in the shard, in order "
        f"(first missing key: {keys[pos]!r}); the metadata partition no longer describes this tar"
    )
