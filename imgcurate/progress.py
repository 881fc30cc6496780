"""Progress bars for long work, on the local Dask schedulers and on a distributed cluster alike."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import dask
from dask.callbacks import Callback
from tqdm.auto import tqdm

from imgcurate import config

T = TypeVar("T")


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A tqdm bar, silent when ``imgcurate.progress`` is false."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not config.show_progress(), leave=False)


class _TaskBar(Callback):
    """Advances a tqdm bar as the local scheduler finishes tasks."""

    def __init__(self, desc: str):
        super().__init__()
        self._desc = desc
        self._bar: tqdm | None = None

    def _start_state(self, dsk, state):
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = bar(desc=self._desc, total=total, unit="task")

    def _posttask(self, key, result, dsk, state, worker_id):
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk, state, errored):
        if self._bar is not None:
            self._bar.close()


def distributed_client() -> Any | None:
    """The active Dask distributed client, or None when work runs on the local schedulers."""
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a core dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def compute(tasks: Sequence[Any], *, desc: str) -> list[Any]:
    """Computes Dask collections or delayed objects with a progress bar, on the active scheduler.

    On a distributed client the bar counts finished outputs as they complete; on the local schedulers it counts
    tasks. Results come back in the order of ``tasks``.
    """
    if not tasks:
        return []
    client = distributed_client()
    if client is None:
        with _TaskBar(desc):
            return list(dask.compute(*tasks))
    futures = client.compute(list(tasks))
    _follow(futures, desc)
    return client.gather(futures)


def persist(collection: T, *, desc: str) -> T:
    """Computes a Dask collection now and keeps its partitions in memory, with a progress bar.

    On a distributed client the partitions stay on the workers (which may spill them to disk); on the local
    schedulers they are held in this process. Later work on the returned collection starts from those partitions
    instead of running the collection's tasks again.
    """
    client = distributed_client()
    if client is None:
        with _TaskBar(desc):
            return collection.persist()
    from distributed import futures_of

    persisted = client.persist(collection)
    _follow(futures_of(persisted), desc)
    return persisted


def _follow(futures: Sequence[Any], desc: str) -> None:
    """Advances a bar as distributed futures finish; raises the first task error as soon as it happens."""
    from distributed import as_completed

    for future in bar(as_completed(futures), desc=desc, total=len(futures), unit="part"):
        if future.status == "error":
            future.result()  # raises the task's exception here, not after the rest finish
