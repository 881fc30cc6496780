"""Reading WebDataset tar shards: members grouped into samples by key, streamed one sample at a time.

Samples are what the ``webdataset`` package (1.0.2, ``tariterators``) makes of a tar, and this module follows its
rules exactly:

- a member ``dir/abc.seg.PNG`` belongs to the sample with key ``dir/abc`` and has extension ``seg.png``: the key is
  the member path up to the first dot of its file name (``base_plus_ext``), extensions are compared in lower case;
- members whose name has no key (``._photo.jpg``, macOS AppleDouble files; ``.hidden``; ``README`` without a dot),
  members that are not regular files (directories, links) and webdataset's metadata names (``__x__``,
  ``__x__/...``) are skipped.

One deliberate difference: webdataset's pattern gives ``dir/._photo.jpg`` the key ``dir/`` (extension ``_photo.jpg``),
so a macOS tar of a folder becomes junk samples named ``dir/`` between the real ones (and, here, duplicate keys). A
key that ends in ``/`` (an empty file name before the dot) is treated as no key and skipped, as at the top level.

Members of one sample are contiguous in the tar; a key that comes back after another key, or an extension seen twice,
is a duplicate sample and an error (webdataset would yield two samples with the same key).

Headers are parsed here, not by ``tarfile``, when they are plain (a regular file, a directory or a link, with an
octal size and no extended header): tarfile's per-member work costs more than reading the bytes of a small sample.
From the first header that is not plain (GNU long names, pax headers, sparse files, the end of the archive, damage)
tarfile reads the rest of the file, so every tar reads as tarfile reads it.

Python's ``tarfile`` treats a corrupt or cut header as the end of the archive, so a damaged tar would silently read
as its first few samples. :func:`iter_samples` therefore checks, when it reaches the end, that the archive really
ends there: two zero blocks (or zeros up to the end of the file) where ``tarfile`` stopped. A member name that is not
UTF-8 is a :class:`~imgcurate.errors.ShardError` too (its key could not be stored in a parquet).
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
from collections.abc import Collection, Iterator
from typing import IO

from imgcurate.errors import AlignmentError, ShardError
from imgcurate.io._fs import open_input

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_IMAGE_EXTS = frozenset(IMAGE_EXTENSIONS)
#: The error of a sample without a member of those extensions (a ``gif`` is not one).
NO_IMAGE = f"sample has no image member ({', '.join(IMAGE_EXTENSIONS[:-1])} or {IMAGE_EXTENSIONS[-1]})"
#: The file buffer of a local tar read with its data: few system calls, so threads seldom wait for the GIL.
_READ_BUFFER = 1 << 20


#: webdataset's ``base_plus_ext``: the key is the path up to the first dot of the file name, which must not be empty.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: webdataset's metadata members, skipped: ``__x__`` at the top level (``meta_prefix``/``meta_suffix``), and any path
#: that starts with ``__x__/`` or is ``__x__`` (``skip_meta``).
_SKIP_META = re.compile(r"__[^/]*__($|/)")

#: The error of a metadata row whose key has no sample in its tar (img2dataset lists failed downloads in the parquet
#: but not in the tar).
NO_SAMPLE = "no sample in the shard for this row"

#: The most bytes of one member that are read into memory (1 GiB). A larger member (a damaged or hostile header, or
#: no image anyone would train on) is not read: its sample records why, and the export refuses to copy it.
MAX_MEMBER_BYTES = 1 << 30


def split_member_name(name: str, lower: bool = True) -> tuple[str | None, str]:
    """Splits a member path into ``(key, extension)`` as webdataset's ``base_plus_ext`` does, the extension in lower
    case unless ``lower`` is false; ``(None, "")`` for a name that belongs to no sample (no dot in the file name, or
    nothing before it, also in a folder: ``dir/._x.jpg``, where webdataset would make the key ``dir/`` and DALI's
    ``wds2idx`` skips it as we do)."""
    match = _BASE_PLUS_EXT.match(name)
    if not match or match.group(1).endswith("/"):
        return None, ""
    return match.group(1), match.group(2).lower() if lower else match.group(2)


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
        errors: problems found with this sample (unsafe names); the sample is still returned.
    """

    key: str
    members: dict[str, bytes] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    #: extension -> why its bytes were not read though asked for (over :data:`MAX_MEMBER_BYTES`)
    unread: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        """The extension of the sample's image member, or None when it has none. Of several, the first in the order
        of :data:`IMAGE_EXTENSIONS` (``jpg`` before ``png``), whatever their order in the tar."""
        found = {ext.lower(): ext for ext in self.sizes if ext.lower() in _IMAGE_EXTS}
        return next((found[ext] for ext in IMAGE_EXTENSIONS if ext in found), None)

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return None if ext is None else self.members.get(ext)


#: Header type bytes read here without tarfile: regular files (their data follows the header) and the other types
#: tarfile reads as they are (links, devices, directories, fifos: no data follows).
_REGULAR_TYPES = frozenset(b"0\x007")
_OTHER_TYPES = frozenset(b"123456")
_BLOCK = tarfile.BLOCKSIZE


def _plain_header(buf: bytes) -> tuple[bytes, int, bool] | None:
    """``(name, size, regular)`` of a header block that ``tarfile`` reads as one member on its own, or None.

    None means "let tarfile read from here": the end-of-archive blocks, a damaged or cut header, GNU long names, pax
    and sparse headers, base-256 sizes. The fields are parsed as ``tarfile.TarInfo.frombuf`` parses them (the name is
    the ustar prefix, if any, joined to the name; the checksum is the unsigned sum), only faster: a shard of small
    samples spends more time in tarfile's header parsing than in reading the bytes.
    """
    if len(buf) != _BLOCK:
        return None
    kind = buf[156]
    if (kind not in _REGULAR_TYPES and kind not in _OTHER_TYPES) or buf[124] & 0x80:
        return None
    try:
        chksum = int(buf[148:156].split(b"\0", 1)[0] or b"0", 8)
        size = int(buf[124:136].split(b"\0", 1)[0] or b"0", 8)
    except ValueError:
        return None
    if chksum != 256 + sum(buf[:148]) + sum(buf[156:]):  # the checksum field counts as eight spaces
        return None
    name = buf[:100].split(b"\0", 1)[0]
    regular = kind in _REGULAR_TYPES and not (kind == 0 and name.endswith(b"/"))  # a v7 directory: "dir/"
    if not regular and (kind == 0 or kind == ord("5")):
        name = name.rstrip(b"/")
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name, size, regular


class _Members:
    """The members of an open tar, in order: ``(name, size, regular)``; :meth:`read` gives the current one's bytes.

    Plain headers are parsed by :func:`_plain_header`; from the first header that is not plain (or the end of the
    archive) on, ``tarfile`` reads the rest, so exotic tars read exactly as tarfile reads them. After the loop,
    ``end`` is the offset where the archive ended (where tarfile found no further header). Member names that are not
    UTF-8 are a :class:`ShardError`; tarfile's own ``ReadError`` past the first member is left to the caller.
    """

    def __init__(self, path: str, fileobj: IO[bytes]):
        self.path = path
        self.f = fileobj
        self.end = 0
        self._data = 0  # where the current member's data starts
        self._pos = 0  # the file's position, tracked here: tell() on a buffered file is a system call

    def __iter__(self) -> Iterator[tuple[str, int, bool]]:
        f = self.f
        offset = 0
        while True:
            if self._pos != offset:
                f.seek(offset)
            buf = f.read(_BLOCK)
            self._pos = offset + len(buf)
            header = _plain_header(buf)
            if header is None:
                yield from self._by_tarfile(offset)
                return
            raw, size, regular = header
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad = raw.decode("utf-8", "surrogateescape")
                raise ShardError(self.path, f"member name {ascii(bad)} is not UTF-8") from None
            self._data = offset + _BLOCK
            offset = self._data + (-(-size // _BLOCK) * _BLOCK if regular else 0)
            yield name, size, regular

    def _by_tarfile(self, offset: int) -> Iterator[tuple[str, int, bool]]:
        self.f.seek(offset)
        self._pos = -1  # tarfile moves the file
        if offset == 0:
            tar = _open_tar(self.path, self.f)
        else:
            tar = tarfile.TarFile(fileobj=self.f, mode="r", encoding="utf-8", errors="surrogateescape")
        try:
            while True:
                info = tar.next()
                if info is None:
                    self.end = tar.offset
                    return
                tar.members.clear()  # tarfile keeps every header otherwise; we stream
                try:
                    info.name.encode("utf-8")
                except UnicodeEncodeError:
                    raise ShardError(self.path, f"member name {ascii(info.name)} is not UTF-8") from None
                self._data = info.offset_data
                self._pos = -1
                yield info.name, info.size, info.isreg()
        finally:
            tar.close()

    def read(self, size: int) -> bytes:
        """The current member's data (``size`` bytes, fewer if the file is cut)."""
        if self._pos != self._data:
            self.f.seek(self._data)
        data = self.f.read(size)
        self._pos = self._data + len(data)
        return data


def _open_tar(path: str, fileobj: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as err:
        raise ShardError(path, unreadable_tar(fileobj, err)) from None


#: The first bytes of compressed files that a shard named ``.tar`` sometimes is.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def unreadable_tar(fileobj: IO[bytes], err: Exception) -> str:
    """What is wrong with a file that ``tarfile`` cannot open as an uncompressed tar: a compressed tar is named as
    such (shards are read uncompressed, seeking to each member)."""
    try:
        fileobj.seek(0)
        head = fileobj.read(6)
    except OSError:
        head = b""
    kind = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        return f"a {kind}-compressed file, not an uncompressed tar: decompress it (shards are read by seeking)"
    return f"not a readable tar file ({err})"


def check_end(path: str, fileobj: IO[bytes], offset: int, samples: int) -> None:
    """Raises unless the archive ends at ``offset``: two zero blocks there, or zeros up to the end of the file.

    ``tarfile`` stops without an error at a header it cannot parse (a bad checksum, a cut), so this is the only way
    to tell the real end of the archive from damage.
    """
    fileobj.seek(offset)
    tail = fileobj.read(2 * tarfile.BLOCKSIZE)
    if not tail:
        raise ShardError(path, f"truncated tar: it ends after {samples} samples without the end-of-archive blocks")
    if tail.strip(b"\0"):
        raise ShardError(path, f"truncated or corrupt tar: unreadable header at byte {offset} after {samples} samples")
    more = _next_header(fileobj, offset + len(tail))
    if more is not None:
        raise ShardError(path, f"corrupt tar: zeros end the archive after {samples} samples, but a member header "
                               f"follows at byte {more} (a zeroed stretch, or two tars joined): its samples would be "
                               "lost")  # fmt: skip


#: How much of a tar's tail :func:`_next_header` reads at a time (whole blocks).
_TAIL_CHUNK = 1 << 20


def _header_at(chunk: bytes, at: int) -> bool:
    try:
        tarfile.TarInfo.frombuf(chunk[at : at + tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _next_header(fileobj: IO[bytes], offset: int) -> int | None:
    """The offset of a valid tar header after the end-of-archive blocks at ``offset`` (block-aligned), if any.

    The tail of a sound tar is zeros (the end blocks padded to the record size, usually under 10 KiB), sometimes
    followed by bytes that are not tar (left alone). A header with a valid checksum there is more archive: a stretch
    of the tar zeroed by a crash, or a second tar appended, whose members tarfile never reaches. Headers are found by
    their ustar magic (every format Python, GNU and webdataset write), plus the first block that is not zeros (an
    old v7 header has no magic); the rest of a file is read only where it is not zeros up to its end.
    """
    fileobj.seek(offset)
    at = offset
    first = True
    while chunk := fileobj.read(_TAIL_CHUNK):
        if first and chunk.strip(b"\0"):
            lead = len(chunk) - len(chunk.lstrip(b"\0"))
            block = lead - lead % tarfile.BLOCKSIZE
            if _header_at(chunk, block):
                return at + block
            first = False
        found = chunk.find(b"ustar", 257)
        while found >= 0:
            block = found - 257
            if block % tarfile.BLOCKSIZE == 0 and _header_at(chunk, block):
                return at + block
            found = chunk.find(b"ustar", found + 1)
        at += len(chunk)
    return None


def _sample_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a regular member's name, or None for names webdataset skips (see module docs)."""
    if name.startswith("__") and (("/" not in name and name.endswith("__")) or _SKIP_META.match(name)):
        return None
    key, ext = split_member_name(name)
    return None if key is None else (key, ext)


def iter_samples(
    path: str,
    *,
    storage_options: dict | None = None,
    wanted: Collection[str] | None = None,
    exts: Collection[str] | None = None,
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
        ShardError: the file is not a tar, is truncated or corrupt (checked up to its end-of-archive blocks when
            read to the end), has a member name that is not UTF-8, or holds the same key twice.
    """
    with open_input(path, storage_options, _READ_BUFFER if read_data else -1) as f:
        members = _Members(path, f)
        seen: set[str] = set()
        current: Sample | None = None
        read_it = False  # whether the current sample's members are read
        try:
            try:
                for name, size, regular in members:
                    parts = _sample_member(name) if regular else None
                    if parts is None:
                        continue
                    key, ext = parts
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        if key in seen:
                            raise ShardError(path, f"duplicate sample key {key!r} (its members are not contiguous)")
                        seen.add(key)
                        current = Sample(key)
                        read_it = read_data and (wanted is None or key in wanted)
                    if ext in current.sizes:
                        raise ShardError(path, f"duplicate member {name!r}: two samples share the key {key!r}")
                    if unsafe_member_name(name):
                        current.errors.append(f"unsafe member name {name!r}")
                    current.sizes[ext] = size
                    if read_it and (exts is None or ext in exts) and size > MAX_MEMBER_BYTES:
                        why = f"member {name!r} holds {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit: not read"
                        current.unread[ext] = why
                        current.errors.append(why)
                    elif read_it and (exts is None or ext in exts):
                        data = members.read(size)
                        if len(data) != size:
                            raise ShardError(path, f"truncated tar: member {name!r} has {len(data)} of {size} bytes")
                        current.members[ext] = data
            except tarfile.ReadError as err:
                raise ShardError(path, f"truncated or corrupt tar after {len(seen)} samples ({err})") from None
            check_end(path, f, members.end, len(seen))
            if current is not None:
                yield current
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(path, f"truncated or corrupt tar ({err})") from None


def read_keys(path: str, *, storage_options: dict | None = None) -> list[str]:
    """The sample keys of a tar shard, in order, reading headers only."""
    return [s.key for s in iter_samples(path, storage_options=storage_options, read_data=False)]


def aligned_samples(
    tar: str,
    keys: list[str],
    storage_options: dict | None = None,
    *,
    exts: Collection[str] | None = None,
) -> Iterator[Sample | None]:
    """The tar's sample for each metadata key, in order, streamed from the tar; None for a key the tar does not hold.

    ``keys`` must appear in the tar in the same order (a row-filtered metadata partition is fine). A key that is not
    in the tar at all gives None: img2dataset lists failed downloads in its parquet but writes no sample for them,
    and such rows are kept (see :data:`NO_SAMPLE`). Only the shard's keys are held in memory.

    Raises:
        AlignmentError: a key is in the tar but out of order (the rows were reordered), naming the shard and key.
    """
    if not keys:
        return
    row_of: dict[str, int] = {}
    for row, key in enumerate(keys):
        if row_of.setdefault(key, row) != row:
            raise AlignmentError(f"{tar}: the metadata has the key {key!r} twice; it no longer describes this tar")
    pos = 0
    skipped = False  # rows given None before the tar's end: read on to make sure their keys do not come later
    for sample in iter_samples(tar, storage_options=storage_options, wanted=row_of.keys(), exts=exts):
        row = row_of.get(sample.key)
        if row is None:
            continue
        if row < pos:
            raise AlignmentError(
                f"{tar}: metadata row {row} (key {sample.key!r}) comes after row {pos - 1} (key {keys[pos - 1]!r}) in "
                "the shard: the metadata partition no longer describes this tar in order"
            )
        skipped = skipped or row > pos
        for _ in range(pos, row):
            yield None
        yield sample
        pos = row + 1
        if pos == len(keys) and not skipped:
            return
    for _ in range(pos, len(keys)):
        yield None


def aligned_images(
    tar: str, keys: list[str], storage_options: dict | None = None
) -> Iterator[tuple[bytes | None, str | None]]:
    """(image bytes or None, error or None) for each metadata key, in order, streamed from the tar.

    A key with no sample in the tar gives ``(None, NO_SAMPLE)``; see :func:`aligned_samples`.

    Raises:
        AlignmentError: the keys are in the tar in another order, naming the shard and the key.
    """
    for sample in aligned_samples(tar, keys, storage_options, exts=_IMAGE_EXTS):  # captions and json stay unread
        if sample is None:
            yield None, NO_SAMPLE
            continue
        image = sample.image
        yield image, (None if image is not None else sample.unread.get(sample.image_ext or "", NO_IMAGE))


def missing_rows(tar: str, keys: list[str], tar_keys: list[str]) -> set[int]:
    """The metadata rows whose key is not in the tar; raises :class:`AlignmentError` when the others are not in the
    tar's order (``tar_keys``)."""
    position = {key: i for i, key in enumerate(tar_keys)}
    missing: set[int] = set()
    last = -1
    for row, key in enumerate(keys):
        at = position.get(key)
        if at is None:
            missing.add(row)
        elif at <= last:
            raise AlignmentError(
                f"{tar}: metadata row {row} (key {key!r}) is before an earlier row's sample in the shard: the metadata "
                "partition no longer describes this tar in order"
            )
        else:
            last = at
    return missing
