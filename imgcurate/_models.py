"""Per-process model cache: a model is loaded once per Dask worker process and shared by its threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

_lock = threading.Lock()
_models: dict[Hashable, Any] = {}


def cached_model(key: Hashable, load: Callable[[], Any]) -> Any:
    """Returns the model stored under ``key``, loading it with ``load()`` the first time."""
    with _lock:
        if key not in _models:
            _models[key] = load()
        return _models[key]


def clear() -> None:
    """Forgets every cached model (tests, or to free memory)."""
    with _lock:
        _models.clear()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable (the rule of :mod:`imgcurate.device`), else ``cpu``."""
    from imgcurate.device import resolve_device as resolve

    return resolve(device)


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads from the Hugging Face hub."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")


def in_hf_cache(repo: str, filenames: list[str]) -> bool:
    """Whether one of ``filenames`` of hub repository ``repo`` (``name@revision`` allowed) is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo.strip("/").partition("@")
    return any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in filenames)
