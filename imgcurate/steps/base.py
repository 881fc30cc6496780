"""The step contract: every step (embedders, classifiers, filters, dedup, and users' own) is built the same way.

A step is an object configured by its constructor and applied with ``step(dataset) -> dataset``. It declares:

- ``requires``: the optional packages it needs, checked when it is constructed (a :class:`MissingDependencyError`
  with the ``pip install`` line), so a pipeline fails before any work;
- :meth:`Step.input_columns`: the metadata columns it reads;
- :meth:`Step.output_columns`: the columns it adds, with their arrow types.

From these the base class checks the column flow on ``meta`` (:meth:`Step.check`; a step that needs a number of
rows also checks the input's row count, known at open, in :meth:`Step.check_rows`), builds the step's ``meta`` once
(:meth:`Step.output_meta`), and adds the step's columns to the dataset. A step computes a frame of its new columns
only (:meth:`Step.added`): one partition per shard, the same rows in the same order. That frame is what a pipeline
writes per shard into its run directory, and what :meth:`Step.__call__` puts beside the metadata.

Most steps work shard by shard: subclass :class:`ShardStep` and fill in :meth:`ShardStep.process`, which receives one
partition (only the columns the step reads) and its :class:`~imgcurate._dask.Shard` (index and tar path): the task
carries that shard and nothing that grows with the dataset. Steps that need every row at once (dedup) implement
:meth:`Step.added` with Dask shuffles and reductions.

Example, a step of one's own (usable from YAML as ``mypkg.steps:CaptionLength``)::

    class CaptionLength(ShardStep):
        def __init__(self, column: str = "caption_chars"):
            self.column = column

        def input_columns(self, id_col):
            return ["caption"]

        def output_columns(self):
            return {self.column: pa.int64()}

        def process(self, part, shard, io):
            return {self.column: part["caption"].str.len().fillna(0).astype("int64").to_numpy()}
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import pyarrow as pa

from imgcurate._dask import Shard
from imgcurate.backends import backend_of, empty_frame, to_pandas, with_columns
from imgcurate.errors import MissingDependencyError

if TYPE_CHECKING:
    import dask.dataframe as dd

    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["Requirement", "Step", "ShardStep", "ShardIO", "ColumnError"]


class ColumnError(ValueError):
    """A step reads a column that the metadata does not have (or has with the wrong type) at that point."""


@dataclasses.dataclass(frozen=True)
class Requirement:
    """An optional package a step needs: the module it imports, the pip package, and the imgcurate extra."""

    module: str
    package: str
    extra: str | None = None

    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or broken
            return False

    def check(self, owner: str) -> None:
        """Raises :class:`MissingDependencyError` naming ``owner`` when the module is not installed."""
        if not self.installed():
            raise MissingDependencyError(owner, self.package, extra=self.extra)


class ShardIO(NamedTuple):
    """What a per-shard function needs to read its shard, besides the shard itself."""

    id_col: str
    storage_options: dict


def _jsonable(value: Any) -> Any:
    if isinstance(value, Step):
        return value.describe()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {type(value).__name__: _jsonable(dataclasses.asdict(value))}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


_DIGESTS: dict[tuple, str] = {}


def local_path(path: str | None) -> str | None:
    """A local file argument made absolute on the client (``~`` expanded), so that every worker opens the same file:
    a worker of a running scheduler has its own working directory. Paths with a protocol are left as they are."""
    if path is None or "://" in str(path):
        return path
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def content_digest(path: str) -> str:
    """The sha256 of a file's bytes, or of a folder's files (their relative paths and digests, in order); cached in
    this process while the file's size and modification time stay the same."""
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(f"{os.path.relpath(full, path)}\0{content_digest(full)}\n".encode())
        return digest.hexdigest()
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


#: The run summary's roles (:meth:`Step.summary_columns`) and the column names the built-in steps give them by default.
SUMMARY_DEFAULTS = {"keep": "keep", "drop_reason": "drop_reason", "duplicates:exact": "exact_duplicate",
                    "duplicate_of:exact": "exact_duplicate_of", "duplicates:semantic": "is_duplicate",
                    "duplicate_of:semantic": "duplicate_of", "similarity:semantic": "max_similarity"}  # fmt: skip


class Step(abc.ABC):
    """Base class of all steps. See the module docs for the contract.

    Class attributes:
        requires: the optional packages the step needs (:class:`Requirement`), checked at construction.
        gpu: ``"no"``, ``"optional"`` (runs on a GPU when one is usable) or ``"required"``; shown by
            ``imgcurate stages``.
        results_version: raised when a change of imgcurate changes what the step computes for the same
            configuration; part of :meth:`describe` from 2 on, so a run directory computed by an earlier version
            computes the step again instead of mixing its old shards with new ones.
    """

    requires: ClassVar[tuple[Requirement, ...]] = ()
    gpu: ClassVar[str] = "no"
    results_version: ClassVar[int] = 1

    def __new__(cls, *args: Any, **kwargs: Any):
        for requirement in cls.requires:
            requirement.check(cls.__name__)
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:  # the constructor itself will say what is wrong (or this is pickle re-creating us)
            self._config = {}
            return self
        given = set(bound.arguments)  # the arguments the caller gave, before the defaults fill in the others
        bound.apply_defaults()
        config = dict(bound.arguments)
        config.pop(next(iter(config)))  # self
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in config:
                given |= set(config[name])
                config.update(config.pop(name))
        self._config = config
        self._given = frozenset(given & set(config))
        return self

    # ------------------------------------------------------------------ what the step is
    @property
    def config(self) -> dict[str, Any]:
        """The constructor's arguments, defaults included: what defines this step's result."""
        return dict(getattr(self, "_config", {}))

    def describe(self) -> dict[str, Any]:
        """The step's class and configuration, as plain JSON values, and the content digests of the local files it
        loads (:meth:`loaded_files`)."""
        cls = type(self)
        out = {"step": f"{cls.__module__}:{cls.__qualname__}", "config": _jsonable(self.config)}
        if cls.results_version > 1:  # version 1 is not written: the descriptions of earlier runs stay the same
            out["results_version"] = cls.results_version
        files = self.loaded_files()
        if files:
            out["files"] = files
        return out

    def loaded_files(self) -> dict[str, str]:
        """The sha256 of each local file (or folder) that an argument ending in ``_path`` names (weights:
        ``checkpoint_path``, ``model_path``), by argument: new weights at the same path are a new step. Remote paths
        are left out."""
        return {name: content_digest(path) for name, path in self.local_files().items() if os.path.exists(path)}

    def local_files(self) -> dict[str, str]:
        """The local files (or folders) that the arguments ending in ``_path`` name, by argument, as the step opens
        them: the attribute of the same name where the constructor made it absolute on the client
        (:func:`local_path`), so that a worker in another folder names the same file. Remote paths are left out."""
        found = {}
        for name, value in sorted(self.config.items()):
            if not name.endswith("_path"):
                continue
            resolved = getattr(self, name, value)
            if isinstance(resolved, str) and "://" not in resolved:
                found[name] = local_path(resolved)
        return found

    def fingerprint(self) -> str:
        """A digest of :meth:`describe`: two steps with the same fingerprint compute the same columns."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        return type(self).__name__

    def prepare(self) -> None:  # noqa: B027 - a hook with nothing to do by default, not an abstract method
        """Fetches, where a run starts and before it is described, what the step decides there (a download that
        every worker then reads). Called by :meth:`__call__` and :meth:`Pipeline.run`, not by the commands that only
        check a config. Default: nothing."""

    def prepare_all(self) -> None:
        """:meth:`prepare` of the steps among this step's arguments (an embedder's fused classifiers), then of this
        step: what a run calls where it starts."""
        for inner in self.inner_steps():
            if isinstance(inner, Step):
                inner.prepare_all()
        self.prepare()

    def check_resources(self) -> None:
        """Checks, before a run does any work, that what the step loads at run time is here (weights in the caches
        when offline). Not part of :meth:`check`, so a config can be written and checked on a machine without them.

        This base check finds the local files that the step's ``*_path`` arguments name (:meth:`local_files`), and
        those of the steps among its arguments (an embedder's fused classifiers). Subclasses that check more call it.

        Raises:
            ImgcurateError: naming what is missing and how to provide it.
        """
        from imgcurate.errors import FileError

        for name, path in self.local_files().items():
            if not os.path.exists(path):
                raise FileError(path, f"not found ({self.name}'s {name})")
        if getattr(self, "_own_resources_only", False):  # resource_problems checks those steps on their own
            return
        for inner in self.inner_steps():
            if isinstance(inner, Step):
                inner.check_resources()

    def resource_problems(self) -> list[str]:
        """What :meth:`check_resources` finds, for this step and for each step among its arguments (an embedder's
        fused heads) separately: the first problem of each, so ``imgcurate doctor`` lists the tower's missing weights
        and every head's at once, where a run stops at the first of them all."""
        from imgcurate.errors import ImgcurateError

        problems = []
        self._own_resources_only = True
        try:
            self.check_resources()
        except ImgcurateError as err:
            problems.append(str(err))
        finally:
            del self._own_resources_only
        for inner in self.inner_steps():
            if isinstance(inner, Step):
                problems += inner.resource_problems()
        return list(dict.fromkeys(problems))

    def device_problems(self) -> list[str]:
        """What keeps a GPU that this step, or a step among its arguments, is told to use (``device: cuda``) from
        working where this runs (a run checks it in its own process when its tasks run on this machine, and on every
        worker of a cluster given by its address); empty when nothing does."""
        from imgcurate import device

        found = []
        for step in [self, *(s for s in self.inner_steps() if isinstance(s, Step))]:
            named = str(getattr(step, "device", "") or "")
            if named.startswith("cuda"):
                index = named.partition(":")[2]
                problem = device.torch_cuda_visible_problem(int(index) if index.isdigit() else 0)
                if problem:
                    found.append(f"{step.name}: device {named!r}, but {problem}: use device 'auto' or 'cpu'")
        return found

    def inner_steps(self) -> list[Any]:
        """The steps among this step's arguments, as the constructor built them: an embedder's fused classifiers
        (:class:`Step` objects, or any object with ``output_columns``)."""
        found = []
        for name, value in self.config.items():
            value = getattr(self, name, value)  # as the constructor built it: an embedder's classifiers are objects
            for inner in value if isinstance(value, list | tuple) else [value]:
                if isinstance(inner, Step) or callable(getattr(inner, "output_columns", None)):
                    found.append(inner)
        return found

    def worker_requirements(self, backend: str) -> list[Requirement]:
        """The optional packages this step imports where its tasks run, for a metadata frame of ``backend``
        (``pandas`` or ``cudf``): :attr:`requires`, and what the step chooses when it is configured (a KMeans
        backend). A pipeline on a cluster it did not start checks them on every worker before any work."""
        return list(type(self).requires)

    def thresholds(self) -> dict[str, list[tuple[str, float]]]:
        """The numeric thresholds this step applies, ``column -> [(label, value)]``; the run report draws them on
        the columns' histograms. Filters fill this in; most steps apply none."""
        return {}

    def upstream_warnings(self, writers: Mapping[str, Step]) -> list[str]:
        """What is doubtful about the steps before this one in a pipeline, given ``writers`` (each column written so
        far -> the step that writes it); the pipeline's check warns with each. None by default (a filter preset
        set on another model's scores says so)."""
        return []

    def thresholds_for(self, dataset: ImageTextPairDataset) -> dict[str, list[tuple[str, float]]]:
        """:meth:`thresholds` for ``dataset`` when :meth:`added` has not run in this process: a step whose threshold
        is a statistic of the data (a quantile) computes it here. A run directory calls this when every shard's
        result is stored but the thresholds that went with them are not (a run killed between the two)."""
        return self.thresholds()

    def summary_columns(self) -> dict[str, str]:
        """Which of this step's output columns the run summary counts, by role: ``keep`` (a filter's boolean
        column), ``drop_reason`` (its reasons, ``;``-separated), ``duplicates:<kind>`` (a dedup's boolean column,
        counted as duplicates of that kind) with ``duplicate_of:<kind>`` and ``similarity:<kind>`` (the run report's
        duplicate groups). By default the output columns of the built-in steps' default names
        (:data:`SUMMARY_DEFAULTS`): a step of one's own that writes ``drop_reason`` or ``is_duplicate`` is counted
        without saying so; one whose columns have other names overrides this."""
        outputs = set(self.output_columns())
        return {role: column for role, column in SUMMARY_DEFAULTS.items() if column in outputs}

    # ------------------------------------------------------------------ the column flow
    def input_columns(self, id_col: str) -> list[str]:
        """The metadata columns this step reads (the id column is always there)."""
        return []

    @abc.abstractmethod
    def output_columns(self) -> dict[str, pa.DataType]:
        """The columns this step adds, with their arrow types."""

    def check(self, meta: Any, id_col: str) -> None:
        """Checks, on the metadata's ``meta`` (no data), that every column this step reads is there.

        Raises:
            ColumnError: a column is missing, naming the step, the column and what is there.
        """
        if id_col in self.output_columns():
            raise ColumnError(f"{self.name}: writes the key column {id_col!r}: give its output another name")
        present = list(map(str, meta.columns))
        missing = [c for c in self.input_columns(id_col) if c not in present]
        if missing:
            raise ColumnError(
                f"{self.name} reads column(s) {', '.join(map(repr, missing))} that the metadata does not have at this "
                f"point (columns: {', '.join(present)}); add the step that makes them before this one"
            )

    def check_rows(self, rows: int) -> None:
        """Checks that ``rows`` input rows (:attr:`ImageTextPairDataset.input_rows`, known at open) are enough for
        this step, before any work. Steps that need a minimum override it (semantic dedup: ``n_clusters``). ``rows``
        bounds the rows the step sees from above (a frame given to ``with_metadata`` may hold fewer), so an override
        tests a minimum only.

        Raises:
            ValueError: naming the step, what it needs and the rows there are.
        """
        return None  # most steps work on any number of rows

    def output_meta(self, meta: Any) -> Any:
        """The empty frame of this step's new columns, of the same backend as ``meta``."""
        return empty_frame(self.output_columns(), backend_of(meta).name)

    # ------------------------------------------------------------------ running
    @abc.abstractmethod
    def added(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        """This step's new columns for ``dataset``: a lazy frame, one partition per shard, rows as the metadata's."""

    def added_from_storage(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        """:meth:`added` for a dataset whose metadata is read from storage, as a pipeline with a run directory has it
        (the input's own files and each earlier step's results read back from disk), so that reading it again costs
        a read, not a recomputation. A step that needs a global answer before its per-shard pass (KMeans centroids)
        may compute that answer first, in passes of its own, instead of holding every shard in memory until it is
        known. Default: :meth:`added`."""
        return self.added(dataset)

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Adds this step's columns to the dataset's metadata (lazily: nothing is computed here)."""
        self.check(dataset.metadata._meta, dataset.id_col)
        if dataset.input_rows is not None:
            self.check_rows(dataset.input_rows)
        self.prepare_all()
        return dataset.with_columns(self.added(dataset), self.output_columns())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{self.name}({args})"


class ShardStep(Step):
    """A step that computes its columns shard by shard (see the module docs)."""

    @abc.abstractmethod
    def process(self, part: Any, shard: Shard, io: ShardIO) -> Mapping[str, Any]:
        """The new columns for one partition.

        Args:
            part: the partition, with the id column and :meth:`input_columns` (pandas or cuDF).
            shard: its index and tar path.
            io: the id column and the storage options, to read the tar.

        Returns:
            Column name -> values (numpy array, pandas Series or arrow array), one per row of ``part``, in order.
        """

    def read_columns(self, meta: Any, id_col: str) -> list[str]:
        """The columns each task receives besides the id column (default: :meth:`input_columns`)."""
        return self.input_columns(id_col)

    def added(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        df = dataset.metadata
        wanted = list(dict.fromkeys([dataset.id_col, *self.read_columns(df._meta, dataset.id_col)]))
        frame = df[wanted]
        io = ShardIO(dataset.id_col, dataset.storage_options)
        return dataset.map_shards(_run_shard, self, io, meta=self.output_meta(df._meta), frame=frame)

    def process_partition(self, part: Any, shard: Shard, io: ShardIO) -> Any:
        """:meth:`process`, as a frame of the new columns (what each task of :meth:`added` returns)."""
        columns = self.process(part, shard, io)
        types = self.output_columns()
        if set(columns) != set(types):
            got, declared = ", ".join(sorted(columns)), ", ".join(sorted(types))
            raise ValueError(f"{self.name}.process returned the columns [{got}], but it declares [{declared}]")
        for name, values in columns.items():
            if len(values) != len(part):
                raise ValueError(f"{shard.tar}: {self.name}.process returned {len(values)} values of {name!r} for "
                                 f"the shard's {len(part)} rows")  # fmt: skip
        try:
            return with_columns(part[[]], columns, types)[list(types)]
        except (TypeError, ValueError, pa.ArrowException) as err:
            raise ValueError(f"{shard.tar}: {self.name}.process returned values of the wrong type for its declared "
                             f"columns ({err})") from None  # fmt: skip


def _run_shard(part: Any, shard: Shard, step: ShardStep, io: ShardIO) -> Any:
    return step.process_partition(part, shard, io)


def host_frame(part: Any) -> Any:
    """A partition on the host as pandas (a no-op on pandas): for steps whose work runs in Python per row."""
    return to_pandas(part)
