"""One place for imgcurate's defaults, layered on dask's config system.

The defaults live in ``imgcurate.yaml`` beside this module and are merged into ``dask.config`` under the
``imgcurate`` namespace, so users override them the dask way: a YAML file in ``~/.config/dask``,
``dask.config.set({"imgcurate.backend": "pandas"})`` or ``DASK_IMGCURATE__BACKEND=pandas``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = pathlib.Path(__file__).with_name("imgcurate.yaml")

with _DEFAULTS_FILE.open() as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)


def get(key: str, default: Any = None) -> Any:
    """Returns ``imgcurate.<key>`` from dask's config (``default`` when unset)."""
    return dask.config.get(f"imgcurate.{key}", default=default)


def get_int(key: str, default: int) -> int:
    """``imgcurate.<key>`` as an integer (``default`` when unset or null).

    Raises:
        ValueError: naming the setting and its environment variable, when the value is not an integer.
    """
    value = get(key, default)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        variable = "DASK_IMGCURATE__" + key.upper().replace("-", "_").replace(".", "__")
        raise ValueError(f"imgcurate.{key} (environment: {variable}): expected an integer, got {value!r}") from None


def home() -> pathlib.Path:
    """The cache folder for weight files: ``$IMGCURATE_HOME``, else ``imgcurate.home`` from the config."""
    value = os.environ.get("IMGCURATE_HOME") or get("home") or "~/.cache/imgcurate"
    return pathlib.Path(value).expanduser()


def show_progress() -> bool:
    """Whether long work shows progress bars."""
    return bool(get("progress", True))
