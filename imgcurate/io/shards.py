"""Writing shards (deterministic tar + parquet, atomically) and scanning a tar into its metadata table."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow as pa

from imgcurate.io._fs import atomic_open, open_output, temp_name, write_parquet
from imgcurate.io.index import format_index, save_index
from imgcurate.io.tar import NO_IMAGE, iter_samples

__all__ = [
    "ShardWriter",
    "new_key",
    "scan_shard",
    "own_fields",
    "caption_or_json",
    "columns_to_table",
    "load_json",
    "JSONTooDeepError",
    "MAX_JSON_DEPTH",
    "encodable",
    "atomic_open",
    "write_parquet",
]

#: Columns that every scanned shard has, besides the fields of its json members.
KEY_COLUMN = "key"
CAPTION_COLUMN = "caption"
ERROR_COLUMN = "error"


def new_key(shard_index: int, index_in_shard: int, samples_per_shard: int) -> str:
    """The key of the ``index_in_shard``-th sample of output shard ``shard_index``.

    Keys are the shard number (5 digits or more) followed by the position in the shard, zero-padded to as many
    digits as ``samples_per_shard - 1`` has: with 10,000 samples per shard, sample 7 of shard 3 is ``000030007``.
    Keys never collide, and sort in export order as text up to shard 99,999 (past it the shard number has more
    digits: compare keys as numbers, as shard folders are listed).
    """
    width = len(str(max(samples_per_shard - 1, 1)))
    return f"{shard_index:05d}{index_in_shard:0{width}d}"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_BLOCK = tarfile.BLOCKSIZE
#: The header tarfile writes for an empty member with no name; the fast path fills in the name and size fields.
_TEMPLATE = _tar_info("", 0).tobuf(tarfile.GNU_FORMAT, _ENCODING, _ERRORS)
#: The template's checksum without its name and size fields (the checksum field counts as eight spaces).
_TEMPLATE_SUM = 256 + sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + sum(_TEMPLATE[156:])


def _header(name: str, size: int) -> bytes:
    """The GNU tar header that ``tarfile`` writes for a member of :func:`_tar_info`, byte for byte.

    The usual member (a name of at most 100 bytes, under 8 GiB) is built from :data:`_TEMPLATE`, several times faster
    than ``TarInfo.tobuf``; other members (long names, which need GNU long-name blocks) go through tarfile.
    """
    raw = name.encode(_ENCODING, _ERRORS)
    if len(raw) > 100 or size >= 8**11:
        return _tar_info(name, size).tobuf(tarfile.GNU_FORMAT, _ENCODING, _ERRORS)
    size_field = b"%011o\0" % size
    chksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, bytes(100 - len(raw)), _TEMPLATE[100:124], size_field, _TEMPLATE[136:148], chksum,
                     _TEMPLATE[156:]))  # fmt: skip


class ShardWriter:
    """Writes one tar shard and its parquet, byte-for-byte reproducibly, under temporary names until closed.

    Members get mtime 0, uid/gid 0 and mode 0644, in the order given, so the same input always makes the same bytes:
    the bytes Python's ``tarfile`` writes in GNU format, headers built here (:func:`_header`) because tarfile's are
    the slowest part of copying small samples. A writer that is not closed (an exception, a crash) leaves no file
    that looks finished. With ``index=True`` the DALI index (``NNNNN.idx``, see :mod:`imgcurate.io.index`) is written
    too, from the offsets known while writing.

    Example:
        >>> with ShardWriter("out/00000.tar") as w:  # doctest: +SKIP
        ...     w.write("000000000", {"jpg": jpeg_bytes, "txt": b"a cat"})
        ...     w.set_metadata(table)
    """

    def __init__(
        self,
        tar_path: str,
        parquet_path: str | None = None,
        storage_options: dict | None = None,
        index: bool = False,
    ):
        self.tar_path = tar_path
        self.parquet_path = parquet_path if parquet_path is not None else _with_suffix(tar_path, ".parquet")
        self.storage_options = storage_options or {}
        self._fs, self._fs_tar = fsspec.core.url_to_fs(tar_path, **self.storage_options)
        self._tmp = temp_name(self._fs_tar)
        self._file = open_output(self._fs, self._tmp)
        self._offset = 0
        self._closed = False
        self._table: pa.Table | None = None
        self._index: list[tuple[str, int, int, str]] | None = [] if index else None
        self.count = 0

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Adds one sample: each member is written as ``<key>.<ext>`` (``<key>.`` for an empty extension, which reads
        back as the same sample's member)."""
        write = self._file.write
        for ext, data in members.items():
            name = f"{key}.{ext}"
            size = len(data)
            header = _header(name, size)
            if self._index is not None:  # the data follows the header, whose size the name decides (long names)
                self._index.append((ext, self._offset + len(header), size, name))
            write(header)
            write(data)
            pad = -size % _BLOCK
            if pad:
                write(bytes(pad))
            self._offset += len(header) + size + pad
        self.count += 1

    def _finish_tar(self) -> None:
        """The end-of-archive blocks and the zeros up to a whole record, as tarfile writes them."""
        if self._closed:
            return
        self._closed = True
        end = self._offset + 2 * _BLOCK
        self._file.write(bytes(2 * _BLOCK + (-end % tarfile.RECORDSIZE)))
        self._file.close()

    def set_metadata(self, table: pa.Table) -> None:
        """The parquet table written beside the tar on close (one row per sample, in order)."""
        self._table = table

    def close(self) -> None:
        """Finishes the tar, writes the parquet and the DALI index, then renames the tar into place (last)."""
        self._finish_tar()
        try:
            if self._table is not None and self._table.num_rows != self.count:
                raise ValueError(
                    f"{self.tar_path}: metadata has {self._table.num_rows} rows for {self.count} samples written"
                )
            if self._index:
                index_text = format_index(self.tar_path, self._index)  # raises before anything is written
            if self._table is not None:
                write_parquet(self._table, self.parquet_path, self.storage_options)
            if self._index:
                save_index(self.tar_path, index_text, self.storage_options)
        except BaseException:
            self.abort()
            raise
        self._fs.mv(self._tmp, self._fs_tar)

    def abort(self) -> None:
        """Drops the unfinished shard."""
        try:
            self._file.close()
            self._closed = True
        finally:
            if self._fs.exists(self._tmp):
                self._fs.rm(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _with_suffix(path: str, suffix: str) -> str:
    base, dot, _ = path.rpartition(".")
    return (base if dot else path) + suffix


def columns_to_table(columns: dict[str, list[Any]]) -> pa.Table:
    """Builds a table from python lists, falling back to JSON text for a column whose values mix types or hold an
    integer that no 64-bit integer type holds (a column of integers up to 2**64 - 1 that only uint64 holds is uint64).

    A column with no value at all keeps arrow's null type, so that a shard where, say, no image had a readable size
    unifies with the shards where ``width`` is an integer (the dataset turns columns that are null everywhere into
    strings when it opens the shards).
    """
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except OverflowError:  # an integer above 2**63 - 1: uint64 when every value fits it (a hash), else text
            arrays[name] = pa.array(values, pa.uint64()) if _unsigned(values) else _text(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types
            arrays[name] = _text(values)
    return pa.table(arrays)


def _text(values: list[Any]) -> pa.Array:
    return pa.array([None if v is None else _as_text(v) for v in values], pa.string())


def _unsigned(values: list[Any]) -> bool:
    return all(v is None or (type(v) is int and 0 <= v < 2**64) for v in values)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


#: How deeply a sample's JSON may nest (objects and lists in one another). Parquet reads at most 100 levels of
#: nested columns, and Python's JSON reader fails near 1,000 with a RecursionError that would stop the whole job.
MAX_JSON_DEPTH = 32


class JSONTooDeepError(ValueError):
    """A JSON document nests deeper than :data:`MAX_JSON_DEPTH` levels."""


def load_json(data: bytes | str) -> Any:
    """``json.loads``, with every string made encodable: JSON may escape a lone UTF-16 surrogate (``"\\ud83d"``, half
    of an emoji cut short), which Python keeps and UTF-8 (arrow, parquet, tar) cannot hold. Such a half becomes
    U+FFFD, the replacement character, as a decoder does with a broken byte; escaped pairs become their character.

    Raises:
        json.JSONDecodeError, UnicodeDecodeError: as ``json.loads``.
        JSONTooDeepError: the document nests deeper than :data:`MAX_JSON_DEPTH` levels.
    """
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONTooDeepError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _nests_deeper(value, MAX_JSON_DEPTH):
        raise JSONTooDeepError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return encodable(value)


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` holds lists and dicts more than ``limit`` levels deep (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in item if isinstance(v, list | dict))
    return False


def encodable(value: Any) -> Any:
    """``value`` with every string in it made UTF-8 encodable (see :func:`load_json`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [encodable(v) for v in value]
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    return value


def _json_fields(data: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        value = load_json(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"json member is not valid JSON ({err})"
    except JSONTooDeepError as err:
        return {}, f"json member is {err}"
    if not isinstance(value, dict):
        return {}, "json member is not a JSON object"
    fields = {k: (v if v is None or isinstance(v, str | int | float | bool) else _as_text(v)) for k, v in value.items()}
    return fields, None


def caption_or_json(caption: str | None, fields: dict[str, Any]) -> str | None:
    """A sample's caption: its own (a ``txt`` member or file) when it has one, else its json's ``caption`` field
    when that is text (the rule for tars scanned without a parquet and for ``imgcurate shard``'s sidecar files)."""
    if caption is None and isinstance(fields.get(CAPTION_COLUMN), str):
        return fields[CAPTION_COLUMN]
    return caption


def own_fields(fields: dict[str, Any], reserved: tuple[str, ...], own: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sample's json fields with those named like the columns imgcurate fills itself (key, caption, error)
    renamed ``source_<name>``, so that they neither replace the sample's own values nor are lost; a field that says
    what ``own`` (the sample's own values) says already is dropped instead (img2dataset's json repeats the key and
    the caption), and so is a null one; a ``source_<name>`` field of the json's own is kept as it is."""
    out = {name: value for name, value in fields.items() if name not in reserved}
    for name in reserved:
        if name in fields and fields[name] is not None and (own is None or fields[name] != own.get(name)):
            out.setdefault(f"source_{name}", fields[name])  # a null field says nothing: no column of nulls
    return out


def scan_shard(path: str, id_col: str = KEY_COLUMN, storage_options: dict | None = None) -> pa.Table:
    """Builds a shard's metadata table by reading its tar (captions and json, not images).

    One row per sample, in tar order: ``id_col`` (the key), ``caption`` (the ``txt`` member, null when absent),
    ``error`` (null, or what is wrong with the sample: no image, caption not UTF-8, bad json, unsafe name), then the
    top-level fields of the ``json`` member (nested values as JSON text). A json field named like one of the first
    three is kept as ``source_<name>`` (as ``imgcurate shard`` keeps them), and a json ``caption`` is the caption of a
    sample without a ``txt`` member.

    Raises:
        ShardError: the tar is unreadable, truncated or has duplicate keys.
    """
    rows: list[dict[str, Any]] = []
    for sample in iter_samples(path, storage_options=storage_options, exts={"txt", "json"}):
        errors = list(sample.errors)
        caption = None
        if "txt" in sample.members:
            try:
                caption = sample.members["txt"].decode("utf-8")
            except UnicodeDecodeError:
                caption = sample.members["txt"].decode("utf-8", errors="replace")
                errors.append("caption is not valid UTF-8 (undecodable bytes replaced)")
        fields: dict[str, Any] = {}
        if "json" in sample.members:
            fields, problem = _json_fields(sample.members["json"])
            if problem:
                errors.append(problem)
        if sample.image_ext is None:
            errors.append(NO_IMAGE)
        if caption == "" and CAPTION_COLUMN in fields and fields[CAPTION_COLUMN] is None:
            caption = None  # img2dataset writes a missing caption as an empty txt beside a json caption of null
        caption = caption_or_json(caption, fields)
        fields = own_fields(
            fields, (id_col, CAPTION_COLUMN, ERROR_COLUMN), {id_col: sample.key, CAPTION_COLUMN: caption}
        )
        fields.update({id_col: sample.key, CAPTION_COLUMN: caption, ERROR_COLUMN: "; ".join(errors) or None})
        rows.append(fields)
    names = [id_col, CAPTION_COLUMN, ERROR_COLUMN]
    for row in rows:
        names.extend(k for k in row if k not in names)
    if not rows:
        return pa.table({n: pa.array([], pa.string()) for n in names})
    return columns_to_table({n: [row.get(n) for row in rows] for n in names})
