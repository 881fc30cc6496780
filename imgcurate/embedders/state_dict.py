"""Weight files (state dicts) read without running code from them, their format told by their first bytes.

Three formats are read: safetensors, torch's zip format (``torch.save``; read with ``weights_only=True``) and torch's
older pickle format (also ``weights_only=True``); and a plain zip holding one ``.pth`` of those (LAION's published
NSFW head), read from the zip in memory. The suffix of the name does not decide: a safetensors file named ``.pth`` is
read as safetensors. :func:`state_dict_shapes` checks a file cheaply (the safetensors header, the zip directory), so
that a damaged file is an error before any work; every problem is a :class:`~imgcurate.errors.WeightFileError` naming
the file (and the zip member) and what is wrong.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import IO, TYPE_CHECKING, Any

from imgcurate.errors import WeightFileError

if TYPE_CHECKING:
    import torch

__all__ = ["read_state_dict", "state_dict_shapes", "weight_format"]

#: A safetensors header is at most this long (safetensors refuses longer ones too).
_MAX_HEADER = 100 << 20

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def weight_format(path: str, head: bytes | None = None) -> str:
    """The format of a weight file from its first bytes: ``safetensors``, ``torch-zip`` (``torch.save``),
    ``torch-pickle`` (torch's legacy format) or ``zip`` (a zip of a ``.pth``, as LAION publishes the NSFW head).

    Raises:
        WeightFileError: the file is empty or none of these.
    """
    if head is None:
        with open(path, "rb") as f:
            head = f.read(16)
    if not head:
        raise WeightFileError(path, "empty file, not weights")
    if head.startswith(_ZIP_MAGIC):
        return "zip"  # torch-zip or a zip holding a .pth: told apart by the zip's members
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise WeightFileError(path, "not a weight file (neither safetensors nor a torch file nor a zip of one)")


def state_dict_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The name and shape of each tensor in a weight file, read cheaply: a safetensors header (checked against the
    file's length), a torch file's tensor records (memory-mapped, no tensor data read), the ``.pth`` in a zip.

    Wrapped state dicts (``{"state_dict": ...}``) and a ``module.`` prefix are unwrapped as :func:`read_state_dict`
    does.

    Raises:
        WeightFileError: the file is damaged (truncated, a broken zip, a malformed header) or not a state dict.
    """
    path = str(path)
    fmt = weight_format(path)
    if fmt == "safetensors":
        with open(path, "rb") as f:
            header = _safetensors_header(path, f, os.fstat(f.fileno()).st_size)
        return _unwrap(path, {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    state = read_state_dict(path, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def read_state_dict(path: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Reads a state dict, never running code from the file (safetensors, or ``torch.load(weights_only=True)``).

    A checkpoint that wraps its weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, and a
    ``module.`` prefix (DataParallel) is removed.

    Args:
        path: the file.
        mmap: map a torch zip-format file instead of reading it (shapes without the data).

    Raises:
        WeightFileError: naming the file (and the zip member) and the problem.
    """
    path = str(path)
    fmt = weight_format(path)
    if fmt == "safetensors":
        with open(path, "rb") as f:
            _safetensors_header(path, f, os.fstat(f.fileno()).st_size)
        from safetensors.torch import load_file

        try:
            return _unwrap(path, load_file(path))
        except Exception as err:  # safetensors' own errors name no file
            raise WeightFileError(path, f"damaged safetensors file ({_first_line(err)})") from None
    if fmt == "torch-pickle":
        return _unwrap(path, _torch_load(path, path))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise WeightFileError(
            path, f"damaged or truncated: its zip directory cannot be read ({_first_line(err)})"
        ) from None
    with archive:
        names = archive.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return _unwrap(path, _torch_load(path, path, mmap=mmap))
        members = [n for n in names if n.endswith(".pth") and not _macos_junk(n)]
        if len(members) != 1:
            listing = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            what = "no .pth file" if not members else "several .pth files"
            raise WeightFileError(path, f"a zip holding {what} ({listing or 'empty'}); expected one state dict")
        where = f"{path}!{members[0]}"
        try:
            with archive.open(members[0]) as member:  # its kind from its first bytes, before inflating all of it
                inner = weight_format(where, member.read(16))
            data = archive.read(members[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise WeightFileError(where, f"cannot be read from the zip ({_first_line(err)})") from None
    if inner == "safetensors":
        from safetensors.torch import load

        _safetensors_header(where, io.BytesIO(data), len(data))
        try:
            return _unwrap(where, load(data))
        except Exception as err:
            raise WeightFileError(where, f"damaged safetensors file ({_first_line(err)})") from None
    if inner == "zip" and not zipfile.is_zipfile(io.BytesIO(data)):
        raise WeightFileError(where, "a damaged torch file, truncated or not a zip")
    return _unwrap(where, _torch_load(where, io.BytesIO(data)))


def _safetensors_header(path: str, f: IO[bytes], size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked: every tensor's data within the file."""
    f.seek(0)
    length = int.from_bytes(f.read(8), "little")
    if length > min(size - 8, _MAX_HEADER):
        raise WeightFileError(path, "a truncated or damaged safetensors file (its header runs past the end)")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightFileError(path, "a damaged safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightFileError(path, "a damaged safetensors file (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(n) if isinstance(n, int) else None for n in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            if start is None or stop is None:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise WeightFileError(
                path, f"a damaged safetensors file (tensor {name!r} has no offsets or shape)"
            ) from None
        if not 0 <= start <= stop or any(n < 0 for n in shape):
            raise WeightFileError(path, f"a damaged safetensors file (tensor {name!r} has invalid offsets or shape)")
        end = max(end, stop)
    if 8 + length + end > size:
        raise WeightFileError(path, "a truncated safetensors file (its tensors run past the end of the file)")
    return header


def _torch_load(path: str, source: str | IO[bytes], mmap: bool = False) -> Any:
    import pickle

    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise WeightFileError(
                path, "holds Python objects besides tensors, which are not loaded (torch.load(weights_only=True))"
            ) from None
        raise WeightFileError(path, f"a damaged torch file ({_first_line(err)})") from None
    except Exception as err:  # torch's own errors name no file
        raise WeightFileError(path, f"a damaged or truncated torch file ({_first_line(err)})") from None


def _unwrap(path: str, state: Any) -> dict[str, Any]:
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        what = "an empty dict" if isinstance(state, dict) else type(state).__name__
        raise WeightFileError(path, f"not a state dict (it holds {what})")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _macos_junk(name: str) -> bool:
    """A resource-fork entry that macOS's zip adds beside each file (``__MACOSX/._name``)."""
    return name.startswith("__MACOSX/") or os.path.basename(name).startswith("._")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__
