"""A pipeline's run directory: each step's columns on disk, one parquet per input shard, so runs resume.

Layout (any fsspec filesystem)::

    run.json                                   what ran: the input, its fingerprint, the steps
    steps/00-TimmImageEmbedder-3f2a9c01d4e5/   one folder per step, named by position, class and fingerprint
        000000.parquet                         the step's columns for shard 0 (row ids and keys included)
        000000.done                            its completion marker: rows, seconds (written after the parquet)
        ...
    steps/.../thresholds.json                  the thresholds a filter step applied (drawn on the report)
    summary.json                               counts in and out, drops by reason, duplicates, time per step
    report.html                                the run report (imgcurate.reports.run)

A step's fingerprint chains the input's fingerprint (every tar and parquet: name, size and modification time or
ETag), the fingerprints of the steps before it and its own configuration; so a changed input, upstream step or
setting gives a new folder and is computed again, and an unchanged one is reused shard by shard. A shard counts as
done only when its ``.done`` marker exists; the parquet before it is written atomically. Later steps, reports and
the export read these files partition by partition: nothing is held in memory between steps.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgcurate import progress
from imgcurate._dask import SHARD_BITS, shard_divisions
from imgcurate.backends import backend_of, from_arrow, host_index, to_arrow, to_pandas
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.errors import ConfigError, ShardError
from imgcurate.io._fs import atomic_open, check_reachable, file_stamp, files_in, remove_temporaries, shard_order
from imgcurate.io.schema import conform, is_error_column

__all__ = ["FINISHED", "ROW_ID", "RunDir", "StepRecord", "input_fingerprint", "fingerprint_chain", "summarize"]

ROW_ID = "_row_id"

#: What only a finished run leaves in its run directory (the report is ``imgcurate.reports.run.REPORT_NAME``). A run
#: of another input or config removes them when it starts (:meth:`RunDir.begin`), so that a rerun that fails leaves
#: no summary or report of the earlier run beside the new ``run.json``.
FINISHED = ("summary.json", "report.html", "exported.json", "exporting.json")


def input_fingerprint(path: str, storage_options: dict | None = None) -> str:
    """A digest of every tar and parquet in an input folder: names, sizes and modification times (and ETags on
    object stores, whose times have whole seconds), read from one listing of the folder, in the order the dataset
    opens its shards (:func:`shard_order`): the step results of shard ``i`` belong to the ``i``-th tar, so another
    order is another input. A symbolic link is stamped with its target's size and time, as it is read as its target."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    digest = hashlib.sha256()
    for info in sorted(fs.ls(root, detail=True), key=lambda i: shard_order(i["name"])):
        name = posixpath.basename(info["name"])
        if name.endswith((".tar", ".parquet")):
            digest.update(f"{name}\0{file_stamp(fs, info)}\n".encode())
    return digest.hexdigest()


@dataclass
class StepRecord:
    """What a run did for one step: its folder, shards computed and reused, and seconds spent."""

    name: str
    folder: str
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    columns: list[str] = field(default_factory=list)
    thresholds: dict[str, list] = field(default_factory=dict)


@dataclass
class RunDir:
    """A run directory (see the module docs).

    Args:
        path: the folder (local or fsspec URL).
        storage_options: passed to fsspec.
        create: create the folder if needed (False to read one that exists).
    """

    path: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    create: bool = True

    def __post_init__(self):
        self.fs, self.root = fsspec.core.url_to_fs(self.path, **self.storage_options)
        check_reachable(self.fs, self.path)
        if self.create:
            try:
                self.fs.makedirs(posixpath.join(self.root, "steps"), exist_ok=True)
            except OSError as err:  # a read-only or full filesystem, no permission
                raise self._unwritable(err) from None

    def url(self, *parts: str) -> str:
        """A path inside the run directory, with its protocol (what ``fsspec.open`` needs in a task)."""
        return self.fs.unstrip_protocol(posixpath.join(self.root, *parts))

    def step_folder(self, position: int, step: Any, fingerprint: str) -> str:
        return f"{position:02d}-{type(step).__name__}-{fingerprint[:12]}"

    def done_shards(self, folder: str) -> set[int]:
        """The shards whose results in ``folder`` are complete: their ``.done`` marker and their parquet are both
        there (a parquet deleted since is computed again)."""
        found = files_in(self.fs, posixpath.join(self.root, "steps", folder), "*.done", "*.parquet")
        names = {posixpath.basename(p) for p in found}
        return {int(n[: -len(".done")]) for n in names if n.endswith(".done") and n[:-5] + ".parquet" in names}

    def compute_step(
        self, dataset: ImageTextPairDataset, step: Any, position: int, fingerprint: str
    ) -> tuple[dd.DataFrame, StepRecord]:
        """Computes the step's columns for the shards not done yet, writes them, and returns the frame that reads
        all of them back (one partition per shard)."""
        folder = self.step_folder(position, step, fingerprint)
        record = StepRecord(step.name, folder, columns=list(step.output_columns()))
        started = time.perf_counter()
        done = self.done_shards(folder)
        todo = [i for i in range(dataset.num_shards) if i not in done]
        record.reused = dataset.num_shards - len(todo)
        record.computed = len(todo)
        types = step.output_columns()
        if todo:
            self.fs.makedirs(posixpath.join(self.root, "steps", folder), exist_ok=True)
        # what a killed run's writers left, also in a folder whose shards are all done (its thresholds.json is
        # written after the last shard)
        remove_temporaries(self.fs, posixpath.join(self.root, "steps", folder))
        if todo:
            added = step.added_from_storage(dataset)  # the input is read from disk: it may be read twice
            frame = dataset.metadata[[dataset.id_col]]
            written = dd.map_partitions(
                _write_shard, frame.partitions[todo], added.partitions[todo], dataset.shards.partitions[todo],
                self.url("steps", folder), dataset.id_col, types, self.storage_options,
                meta=pd.DataFrame({"rows": pd.Series([], dtype="int64")}), align_dataframes=False,
                enforce_metadata=False,
            )  # fmt: skip
            progress.compute([written], desc=f"{step.name}: shards", unit="shard")
        marks = posixpath.join("steps", folder, "thresholds.json")
        # a global threshold (a quantile) is known only where it was computed: written then, and read back after;
        # a file that a kill left out, or damaged, is written again with what the step knows here
        thresholds = None
        if not todo and self.exists(marks):
            try:
                thresholds = self.read_json(marks)
            except ValueError:
                pass
        if thresholds is None:
            if todo:  # the step computed its shards here, so it knows its data's thresholds
                thresholds = step.thresholds() if hasattr(step, "thresholds") else {}
            else:
                thresholds = step.thresholds_for(dataset) if hasattr(step, "thresholds_for") else {}
            self.write_json(marks, thresholds)
            thresholds = self.read_json(marks)
        record.thresholds = thresholds
        record.seconds = time.perf_counter() - started
        meta = step.output_meta(dataset.metadata._meta)
        return self.read_step(folder, dataset, meta, types), record

    def read_step(self, folder: str, dataset: ImageTextPairDataset, meta: Any, types: dict) -> dd.DataFrame:
        """The step's columns read back from its folder, one partition per shard, with the metadata's row ids."""
        backend = backend_of(meta).name
        schema = pa.schema([pa.field(n, t) for n, t in types.items()])
        # on cuDF the partitions keep cuDF's own text columns, as the input's do when it is opened: dask's conversion
        # of text columns (an astype to pandas' arrow string dtype per partition) is for pandas partitions
        with dask.config.set({"dataframe.convert-string": False} if backend == "cudf" else {}):
            return dd.from_map(
                _read_shard, list(range(dataset.num_shards)), args=[self.url("steps", folder), schema, backend,
                                                                    self.storage_options],
                meta=meta, divisions=shard_divisions(dataset.num_shards), label="imgcurate-step-results",
                enforce_metadata=False,
            )  # fmt: skip

    def begin(self, described: dict[str, Any]) -> None:
        """Starts a run: writes ``run.json``; when it describes another run than the last one (the input or a step
        changed), first removes what that run left (:data:`FINISHED`).

        So a rerun on a changed input or config that fails leaves a folder that reads as a run that did not finish,
        not one whose summary describes other results. A rerun of the same input and steps keeps them: they still
        describe its results. Each removal is one file's deletion, atomic on any filesystem, and ``run.json`` is
        written atomically after them.
        """
        try:
            remove_temporaries(self.fs, self.root)  # what writers killed in an earlier run left
            if not self.describes(described):
                for name in FINISHED:
                    try:
                        self.fs.rm(posixpath.join(self.root, name))
                    except FileNotFoundError:
                        pass
            self.write_json("run.json", described)
        except OSError as err:  # a read-only or full filesystem, no permission
            raise self._unwritable(err) from None

    def _unwritable(self, err: OSError) -> ConfigError:
        return ConfigError(f"run_dir: {self.path} cannot be written ({err.strerror or err}): give a run directory "
                           "this process can write")  # fmt: skip

    def describes(self, described: dict[str, Any]) -> bool:
        """Whether ``run.json`` describes this run (the same input and steps); False when it is missing or cannot be
        read (a damaged file is written again). The input is compared as its absolute URL (``input_url``), not as
        it was spelled (``data`` and ``/home/me/data/`` are one input)."""

        def defining(description: Any) -> Any:
            return {k: v for k, v in description.items() if k != "input"} if isinstance(description, dict) else None

        try:
            return self.exists("run.json") and defining(self.read_json("run.json")) == defining(
                json.loads(json.dumps(described, default=str))
            )
        except ValueError:
            return False

    def write_json(self, name: str, value: Any) -> None:
        with atomic_open(self.url(name), "wb", self.storage_options) as f:
            f.write(json.dumps(value, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        """A JSON file of the run directory; :class:`ValueError` naming it when it is not valid JSON."""
        with self.fs.open(posixpath.join(self.root, name), "rb") as f:
            try:
                return json.loads(f.read())
            except (ValueError, RecursionError) as err:
                raise ValueError(f"{self.url(name)}: not valid JSON ({err}); a rerun of the pipeline writes it "
                                 "again") from None  # fmt: skip

    def exists(self, name: str) -> bool:
        return self.fs.exists(posixpath.join(self.root, name))


def _write_shard(
    frame: Any, added: Any, shard: pd.DataFrame, folder: str, id_col: str, types: dict, so: dict
) -> pd.DataFrame:
    index = int(shard["shard"].iloc[0])
    started = time.perf_counter()
    table = to_arrow(added, types)
    ids = pa.array(host_index(frame.index).to_numpy(), pa.int64())
    keys = to_arrow(frame[[id_col]]).column(0)
    table = table.add_column(0, id_col, keys).add_column(0, ROW_ID, ids)
    with atomic_open(f"{folder}/{index:06d}.parquet", "wb", so) as f:
        pq.write_table(table, f)
    marker = {"rows": table.num_rows, "seconds": time.perf_counter() - started}
    with atomic_open(f"{folder}/{index:06d}.done", "wb", so) as f:
        f.write(json.dumps(marker).encode())
    return pd.DataFrame({"rows": [table.num_rows]})


def _read_shard(index: int, folder: str, schema: pa.Schema, backend: str, so: dict) -> Any:
    path = f"{folder}/{index:06d}.parquet"
    try:
        with fsspec.open(path, "rb", **so) as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(path, f"cannot read this step result ({err}); delete it and rerun the pipeline to compute "
                               "it again") from None  # fmt: skip
    again = "; delete it and rerun the pipeline to compute it again"
    missing = [name for name in [ROW_ID, *schema.names] if name not in table.column_names]
    if missing:  # written by another version of the step, or by hand
        raise ShardError(path, f"this step result has no column {missing[0]!r}{again}")
    ids = table.column(ROW_ID).to_numpy()
    if len(ids) and not (ids >> SHARD_BITS == index).all():  # a file copied from another shard's
        raise ShardError(path, f"this step result holds rows of another shard than shard {index}{again}")
    frame = from_arrow(conform(table.select(schema.names), schema), backend)
    frame.index = ids
    return frame


def callable_description(function: Any) -> dict[str, Any]:
    """What defines a plain ``dataset -> dataset`` callable of a pipeline (not a :class:`~imgcurate.steps.Step`,
    which describes itself), as far as can be told without running it, the same in every process: its source code
    (or compiled code where Python finds no source), its defaults, the values in its closure, the globals its code
    names, the function and arguments of a ``functools.partial``, and an object's class and attributes; values are
    read down to plain data (numbers, text, containers, arrays), functions and objects in them likewise. What it
    reads from elsewhere (files, other modules' state) is not seen: make it a Step to describe that. A value that
    cannot be read this way gets a digest of its own for this run only, so the steps after it are always computed
    again."""
    digest = hashlib.sha256()
    _digest_value(function, digest, depth=0, seen=set())
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None) or type(function).__module__
    return {"callable": f"{module}:{name}", "digest": digest.hexdigest()}


def _digest_value(value: Any, digest: Any, depth: int, seen: set[int]) -> None:
    """Feeds ``value`` to ``digest`` in a form that does not depend on the process (see :func:`callable_description`):
    no memory addresses, no set or hash order."""
    import functools
    import inspect
    import types
    import uuid

    import numpy as np

    def feed(*parts: Any) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else str(part).encode())
            digest.update(b"\0")

    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        feed(type(value).__name__, repr(value))
        return
    if depth > 6 or id(value) in seen:  # deep or cyclic: not readable as plain data
        feed("unread", uuid.uuid4().hex)
        return
    seen = seen | {id(value)}
    inner = functools.partial(_digest_value, digest=digest, depth=depth + 1, seen=seen)
    if isinstance(value, list | tuple):
        feed(type(value).__name__, len(value))
        for item in value:
            inner(item)
    elif isinstance(value, dict):
        feed("dict", len(value))
        for key in sorted(value, key=repr):
            inner(key)
            inner(value[key])
    elif isinstance(value, set | frozenset):
        feed("set", len(value), *sorted(repr(item) for item in value))
    elif isinstance(value, np.ndarray | np.generic):
        array = np.ascontiguousarray(value)
        feed("array", array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    elif isinstance(value, types.ModuleType):
        feed("module", value.__name__)
    elif isinstance(value, functools.partial):
        feed("partial")
        inner(value.func)
        inner(value.args)
        inner(value.keywords)
    elif isinstance(value, types.FunctionType):
        feed("function", value.__module__, value.__qualname__)
        try:
            feed(inspect.getsource(value))
        except (OSError, TypeError):  # typed at a prompt: the compiled code
            feed(value.__code__.co_code, repr(value.__code__.co_consts))
        inner(value.__defaults__)
        inner(value.__kwdefaults__)
        inner([cell.cell_contents for cell in value.__closure__ or ()])
        names = value.__code__.co_names
        inner({name: value.__globals__[name] for name in names if name in value.__globals__})
    elif isinstance(value, types.BuiltinFunctionType | types.MethodType):
        feed("method", getattr(value, "__qualname__", ""))
        inner(getattr(value, "__self__", None))
        inner(getattr(value, "__func__", None))
    elif isinstance(value, type):
        feed("class", value.__module__, value.__qualname__)
        try:
            feed(inspect.getsource(value))
        except (OSError, TypeError):
            pass
    else:  # an object: its class, then its attributes
        inner(type(value))
        try:
            attributes = vars(value)
        except TypeError:  # no __dict__ (slots, a C type): unreadable
            feed("unread", uuid.uuid4().hex)
            return
        inner(dict(attributes))


def fingerprint_chain(parts: Sequence[str]) -> str:
    """One digest of several fingerprints, in order."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def summarize(
    dataset: ImageTextPairDataset, records: Sequence[StepRecord], keep_column: str | None,
    roles: Sequence[dict[str, str]] | None = None,
) -> dict:  # fmt: skip
    """The run summary: samples in and kept, drops by reason, duplicates by kind, and per step the shards computed
    and reused and the seconds spent. Small Dask reductions over the written results, in one pass.

    ``roles`` are the steps' :meth:`~imgcurate.steps.Step.summary_columns`, in order: the drops are counted in the
    reason column of the filter that made ``keep_column`` (else of the last filter), the duplicates in each dedup's
    column, under its kind (and its column's name where two dedups share a kind). Drops and duplicates are read from
    the steps' columns only, not from columns the input already had (an earlier curation's); error columns
    (``*_error``) are counted wherever they are, the input's too, as a filter's ``drop_errors`` drops them. ``roles``
    None takes the built-in steps' default names wherever they are columns
    (:data:`~imgcurate.steps.base.SUMMARY_DEFAULTS`)."""
    from imgcurate.steps.base import SUMMARY_DEFAULTS

    df = dataset.metadata
    columns = set(map(str, df.columns))
    if roles is None:
        roles = [{role: column for role, column in SUMMARY_DEFAULTS.items() if column in columns}]
    wanted: dict[str, Any] = {"samples": df[dataset.id_col].size}
    if keep_column and keep_column in columns:
        wanted["kept"] = df[keep_column].fillna(False).astype(bool).sum()
    filters = [r for r in roles if r.get("drop_reason") in columns]
    reason = next((r for r in filters if r.get("keep") == keep_column), filters[-1] if filters else {})
    reason_column = reason.get("drop_reason")
    if reason_column:
        wanted["drops"] = df[reason_column].dropna().str.split(";").explode().value_counts()
    dedups = []  # each dedup step's (kind, flag, duplicate-of, similarity) columns
    for r in roles:
        for role, flag in r.items():
            if role.startswith("duplicates:") and flag in columns:
                kind = role.split(":", 1)[1]
                dedups.append((kind, flag, r.get(f"duplicate_of:{kind}"), r.get(f"similarity:{kind}")))
    dedups = list(dict.fromkeys(dedups))
    kinds = [kind for kind, *_ in dedups]
    for kind, flag, _, _ in dedups:
        key = f"duplicates_{kind} ({flag})" if kinds.count(kind) > 1 else f"duplicates_{kind}"
        wanted[key] = df[flag].fillna(False).astype(bool).sum()
    for column in sorted(c for c in columns if is_error_column(c, df._meta[c].dtype)):
        wanted[f"errors:{column}"] = df[column].notnull().sum()
    got = dict(zip(wanted, progress.compute(list(wanted.values()), desc="run summary"), strict=True))
    summary: dict[str, Any] = {"samples_in": int(got["samples"])}
    if "kept" in got:
        summary["samples_kept"] = int(got["kept"])
        summary["keep_column"] = keep_column
    if reason_column:
        summary["drop_reason_column"] = reason_column
        drops = to_pandas(got["drops"])
        summary["drops_by_reason"] = {str(k): int(v) for k, v in sorted(drops.items())}
    summary["duplicates"] = {k.split("_", 1)[1]: int(v) for k, v in got.items() if k.startswith("duplicates_")}
    # for the run report's duplicate groups
    summary["duplicate_columns"] = [[flag, of, sim if sim in columns else None]
                                    for _, flag, of, sim in dedups if of in columns]  # fmt: skip
    summary["errors"] = {k.split(":", 1)[1]: int(v) for k, v in got.items() if k.startswith("errors:")}
    summary["steps"] = [
        {"step": r.name, "folder": r.folder, "shards_computed": r.computed, "shards_reused": r.reused,
         "seconds": round(r.seconds, 3), "columns": r.columns, "thresholds": r.thresholds}
        for r in records
    ]  # fmt: skip
    return summary
