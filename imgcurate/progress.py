"""Progress bars for long work, on the local Dask schedulers and on a distributed cluster alike."""

from __future__ import annotations

import gc
import threading
import time
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
    """Advances a tqdm bar as the local scheduler finishes tasks.

    With ``unit="shard"`` it counts the graph's outputs (its partitions: the tasks nothing else waits for, or, when a
    single task gathers them, the tasks that one reads), so a step over N shards reads ``k/N shard`` with a rate and
    an ETA; a graph with a single output (a reduction) falls back to counting its tasks.
    """

    def __init__(self, desc: str, unit: str = "task"):
        super().__init__()
        self._desc = desc
        self._unit = unit
        self._bar: tqdm | None = None
        self._counted: set | None = None

    def _start_state(self, dsk, state):
        keys = {k for name in ("ready", "waiting", "running", "finished") for k in state[name]}
        keys.update(state.get("cache", {}))
        outputs = None
        if self._unit != "task":
            dependents, dependencies = state["dependents"], state["dependencies"]
            sinks = [k for k in keys if not dependents.get(k)]
            if len(sinks) >= 2:
                outputs = set(sinks)
            elif len(sinks) == 1 and len(dependencies.get(sinks[0], ())) >= 2:
                outputs = set(dependencies[sinks[0]])
        self._counted = outputs
        total = len(outputs) if outputs is not None else len(keys)
        self._bar = bar(desc=self._desc, total=total, unit=self._unit if outputs is not None else "task")

    def _posttask(self, key, result, dsk, state, worker_id):
        if self._bar is not None and (self._counted is None or key in self._counted):
            self._bar.update(1)

    def _finish(self, dsk, state, errored):
        if self._bar is not None:
            self._bar.close()


class GraphGC:
    """Python's cyclic garbage collector runs less often while Dask builds a task graph (a context manager).

    A graph over 10^5 shards is millions of small objects made in one go, none of them garbage; with the default
    thresholds the collector walks them again and again as they pile up (about a third of the graph's build time
    at 10^5 shards). Inside this context the first generation's threshold is raised to ``graph-gc-threshold``
    (``imgcurate.graph-gc-threshold``; 0 leaves the collector alone), as ``dask scheduler`` and ``dask worker``
    raise theirs for the same reason; the previous thresholds come back when the outermost context ends or
    :meth:`release` is called (once the graph is built, before its tasks run). The thresholds are the process's:
    other threads see them changed meanwhile, nothing else is. A pipeline that starts its own LocalCluster with
    worker processes holds it for the cluster's lifetime, since its scheduler builds the graphs in this process.
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple[int, int, int] | None = None

    def __init__(self) -> None:
        self._held = False

    def __enter__(self) -> GraphGC:
        threshold = config.get_int("graph-gc-threshold", 0)
        if threshold <= 0:
            return self
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._saved = gc.get_threshold()
                first, second, third = cls._saved
                if first > 0:  # a collector turned off (threshold 0) stays off
                    gc.set_threshold(max(first, threshold), max(second, 50), max(third, 100))
            cls._depth += 1
            self._held = True
        return self

    def release(self) -> None:
        """Gives the collector back its previous thresholds (once the graph is built); safe to call twice."""
        cls = type(self)
        with cls._lock:
            if not self._held:
                return
            self._held = False
            cls._depth -= 1
            if cls._depth == 0 and cls._saved is not None:
                gc.set_threshold(*cls._saved)
                cls._saved = None

    def __exit__(self, *exc: object) -> None:
        self.release()


class _ReleaseGC(Callback):
    """Ends a :class:`GraphGC` when the local scheduler has the graph and starts running its tasks."""

    def __init__(self, held: GraphGC):
        super().__init__()
        self._held = held

    def _start_state(self, dsk, state):
        self._held.release()


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


def _fused(collection: T) -> T:
    """A Dask DataFrame collection (frame, series, scalar) with its per-partition chains fused; anything else as it is.

    Dask fuses the chain of per-partition expressions (a read, a projection, a per-shard pass zipped with the shard
    frame) into one task when a frame's own ``persist`` or ``optimize`` builds the graph, but not under
    ``dask.compute``, ``Client.compute`` or ``Client.persist`` (dask 2026.7): there every link is a task, and a
    per-shard pass has two inputs, its partition and its shard frame row (a task of its own, placed like a root on
    any free worker), so the scheduler may run it on the worker that does not hold its partition and fetch the
    partition instead. Fused, the pass is one task whose only input is its partition.

    Only for one collection at a time: collections computed together are left as they are, because each one fused
    on its own would take in, and compute again, the inputs that they share.
    """
    from dask.dataframe.dask_expr._collection import FrameBase

    return collection.optimize() if isinstance(collection, FrameBase) else collection


def compute(tasks: Sequence[Any], *, desc: str, unit: str = "task") -> list[Any]:
    """Computes Dask collections or delayed objects with a progress bar (count, rate and ETA), on the active scheduler.

    ``unit="shard"`` counts the collections' partitions as they finish (a step's per-shard results, one output shard
    of an export): on the local schedulers from the graph's outputs, under a distributed client by persisting the
    collections and following their partitions' futures, then gathering. Otherwise the bar counts tasks locally and
    finished collections under a distributed client. Results come back in the order of ``tasks``.
    """
    if not tasks:
        return []
    if len(tasks) == 1:  # several share their inputs only unfused (see _fused)
        tasks = [_fused(tasks[0])]
    client = distributed_client()
    if client is None:
        with GraphGC() as held, _ReleaseGC(held), _TaskBar(desc, unit):
            return list(dask.compute(*tasks))
    if unit != "task":
        from distributed import futures_of

        with GraphGC():
            persisted = client.persist(list(tasks))
        _follow([f for p in persisted for f in futures_of(p)], desc, unit)
        return client.gather(client.compute(persisted))
    with GraphGC():
        futures = client.compute(list(tasks))
    _follow(futures, desc)
    return client.gather(futures)


def persist(collection: T, *, desc: str) -> T:
    """Computes a Dask collection now and keeps its partitions in memory, with a progress bar.

    On a distributed client the partitions stay on the workers (which may spill them to disk); on the local
    schedulers they are held in this process. Later work on the returned collection starts from those partitions
    instead of running the collection's tasks again.
    """
    collection = _fused(collection)
    client = distributed_client()
    if client is None:
        with GraphGC() as held, _ReleaseGC(held), _TaskBar(desc, "shard"):
            return collection.persist()
    from distributed import futures_of

    with GraphGC():
        persisted = client.persist(collection)
    _follow(futures_of(persisted), desc, "shard")
    return persisted


def _follow(futures: Sequence[Any], desc: str, unit: str = "part") -> None:
    """Advances a bar as distributed futures finish; raises the first task error as soon as it happens, and a
    :class:`~imgcurate.errors.ClusterError` when the cluster has had no worker for ``imgcurate.no-workers-timeout``
    seconds (its tasks would wait for ever: every worker died and none was restarted, or none was started)."""
    from distributed import as_completed

    from imgcurate.errors import ClusterError

    limit = float(config.get("no-workers-timeout", 60) or 0)
    starved = threading.Event()
    stop = threading.Event()

    def watch(client: Any) -> None:
        since = None
        while not stop.wait(min(1.0, limit / 4)):
            try:
                workers = len(client.scheduler_info().get("workers", {}))  # kept fresh by the client, no call
            except Exception:  # noqa: BLE001 - a client closing: nothing to watch
                return
            since = None if workers else since or time.monotonic()
            if since is not None and time.monotonic() - since >= limit:
                starved.set()
                client.cancel(list(futures), reason="the cluster has no worker")
                return

    watcher = None
    if limit > 0 and futures:
        watcher = threading.Thread(target=watch, args=(futures[0].client,), daemon=True, name="imgcurate-no-workers")
        watcher.start()
    try:
        for future in bar(as_completed(futures), desc=desc, total=len(futures), unit=unit):
            if starved.is_set():
                raise ClusterError(f"cluster: no worker for {limit:g} s (every worker died and none was restarted, "
                                   "or none was started); start workers and run again: what finished is kept "
                                   "(imgcurate.no-workers-timeout sets the wait)")  # fmt: skip
            if future.status == "error":
                future.result()  # raises the task's exception here, not after the rest finish
    finally:
        stop.set()
