"""Published weight files: downloaded once into the cache folder, checked, then reused offline."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import urllib.request
import uuid
from dataclasses import dataclass

from imgcurate import config


@dataclass(frozen=True)
class WeightFile:
    """A published weight file: where it is published, the name it is cached under and, if pinned, its sha256."""

    name: str
    url: str
    sha256: str | None = None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_weights(weights: WeightFile, *, download: bool = True) -> pathlib.Path:
    """The local path of a published weight file, downloading it into ``$IMGCURATE_HOME`` on first use.

    The file's sha256 is checked against the pinned value when there is one. Otherwise the digest of the first
    download is recorded beside it (``<name>.sha256``) and checked on every later use, so a file corrupted or replaced
    in the cache is caught.

    Raises:
        FileNotFoundError: the file is not cached and cannot be downloaded; the message says where to put it.
        ValueError: the checksum does not match.
    """
    folder = config.home() / "weights"
    path = folder / weights.name
    record = folder / f"{weights.name}.sha256"
    if not path.exists():
        if not download:
            raise FileNotFoundError(_where_to_put(weights, path, "downloads are off"))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{weights.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with urllib.request.urlopen(weights.url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            digest = sha256_of(tmp)
            if weights.sha256 and digest != weights.sha256:
                raise ValueError(f"{weights.url}: downloaded file has sha256 {digest}, expected {weights.sha256}")
            os.replace(tmp, path)
            record.write_text(digest + "\n")
        except OSError as err:
            raise FileNotFoundError(_where_to_put(weights, path, f"download failed: {err}")) from None
        finally:
            tmp.unlink(missing_ok=True)
    expected = weights.sha256 or (record.read_text().strip() if record.exists() else None)
    if expected:
        digest = sha256_of(path)
        if digest != expected:
            raise ValueError(
                f"{path}: sha256 {digest} does not match the expected {expected}; delete it to re-download"
            )
    return path


def _where_to_put(weights: WeightFile, path: pathlib.Path, why: str) -> str:
    return (
        f"weights {weights.name!r} are not cached and could not be fetched ({why}). Download {weights.url} on a "
        f"machine with network access and put it at {path} ($IMGCURATE_HOME/weights), or pass model_path=."
    )
