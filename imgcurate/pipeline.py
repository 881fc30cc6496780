"""YAML pipelines: a list of step constructors run over a dataset, then an export. The CLI is the Python API.

A config looks like this (``imgcurate init-config`` writes a commented one)::

    input: sample_data/shards        # folder of tar shards (local or fsspec URL)
    output: sample_data/curated      # where the kept samples are re-sharded
    id_col: key
    backend: auto                    # auto | pandas | cudf
    cluster: {n_workers: 2}          # or {address: tcp://scheduler:8786}, or {type: cuda}; omit for no cluster
    steps:
      - SampleFilter: {min_width: 256}
    reports:                         # written after the steps, before the export
      duplicates: sample_data/duplicates.html
      scores: {path: sample_data/scores.png, thresholds: {aesthetic_score: 5.0}}
    export: {filter_column: keep, samples_per_shard: 10000, old_id_col: old_key}

Each step is ``Name: {keyword arguments}``; names resolve through :data:`STAGES`, which imports a step's module only
when a config uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from imgcurate.dataset import ImageTextPairDataset

__all__ = ["STAGES", "REPORTS", "Pipeline", "load_stage", "run_config"]

#: Step name -> "module:attribute". Modules are imported only when a step is used.
STAGES: dict[str, str] = {
    "SampleFilter": "imgcurate.filters:SampleFilter",
    "TimmImageEmbedder": "imgcurate.embedders.timm:TimmImageEmbedder",
    "AestheticClassifier": "imgcurate.classifiers.aesthetic:AestheticClassifier",
    "NsfwClassifier": "imgcurate.classifiers.nsfw:NsfwClassifier",
    "ExactDuplicates": "imgcurate.dedup.exact:ExactDuplicates",
    "SemanticDeduplicator": "imgcurate.dedup.semantic:SemanticDeduplicator",
}


#: Report name -> "module:function(dataset, path)", written by a pipeline's ``reports`` key.
REPORTS: dict[str, str] = {
    "duplicates": "imgcurate.report:duplicate_groups",
    "scores": "imgcurate.report:score_histograms",
}


def _load(table: dict[str, str], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_stage(name: str) -> type:
    """The step class registered under ``name``.

    Raises:
        ValueError: unknown name, listing the valid ones.
    """
    return _load(STAGES, "step", name)


def stage_summary(name: str) -> str:
    """The first line of a step's docstring."""
    try:
        doc = inspect.getdoc(load_stage(name)) or ""
    except ImportError as err:  # a step whose optional dependency is missing still gets listed
        return f"(unavailable: {err})"
    return doc.splitlines()[0] if doc else ""


def _build_step(spec: Any) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"a step is written as 'Name: {{arguments}}', got {spec!r}")
    ((name, kwargs),) = spec.items()
    cls = load_stage(name)
    try:
        return cls(**(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"step {name}: {err}") from None


@contextlib.contextmanager
def _cluster(spec: dict | None) -> Iterator[Any]:
    if not spec:
        yield None
        return
    from distributed import Client, LocalCluster

    from imgcurate.cpu import local_cluster_kwargs

    spec = dict(spec)
    if "address" in spec:
        with Client(spec["address"]) as client:
            yield client
        return
    kind = spec.pop("type", "local")
    if kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:
            from imgcurate.errors import MissingDependencyError

            raise MissingDependencyError("cluster type 'cuda'", "dask-cuda", extra="gpu") from err
        cluster = LocalCUDACluster(**spec)
    elif kind == "local":
        cluster = LocalCluster(**local_cluster_kwargs(spec))  # one 1-thread worker per core, malloc settings
    else:
        raise ValueError(f"unknown cluster type {kind!r}: choose local or cuda, or give an address")
    with cluster, Client(cluster) as client:
        yield client


@dataclass
class Pipeline:
    """Steps applied in order to a dataset, then reports and an optional export.

    Args:
        steps: objects with ``__call__(dataset) -> dataset``.
        export: keyword arguments of :meth:`ImageTextPairDataset.to_webdataset` (``path`` among them), or None.
        reports: report name (see :data:`REPORTS`) -> its keyword arguments, ``path`` (the file to write) among
            them; written after the steps and before the export. In YAML a bare path stands for ``{path: ...}``.
    """

    steps: list[Any]
    export: dict[str, Any] | None = None
    input: str | None = None
    id_col: str = "key"
    backend: str | None = None
    cluster: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        for name, kwargs in self.reports.items():  # an unknown report or argument is an error before any work
            if "path" not in kwargs:
                raise ValueError(f"report {name}: give the file to write as 'path'")
            try:
                inspect.signature(_load(REPORTS, "report", name)).bind(None, **kwargs)
            except TypeError as err:
                raise ValueError(f"report {name}: {err}") from None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Pipeline:
        known = {"input", "output", "id_col", "backend", "cluster", "steps", "reports", "export", "storage_options"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        reports = config.get("reports") or {}
        if not isinstance(reports, dict):
            raise ValueError(f"reports is written as 'name: file' or 'name: {{path: file, ...}}', got {reports!r}")
        export = dict(config.get("export") or {})
        if config.get("output"):
            export.setdefault("path", config["output"])
        return cls(
            steps=[_build_step(s) for s in config.get("steps") or []],
            export=export if export.get("path") else None,
            input=config.get("input"),
            id_col=config.get("id_col", "key"),
            backend=config.get("backend"),
            cluster=config.get("cluster"),
            options={"storage_options": config.get("storage_options")},
            reports={str(k): dict(v) if isinstance(v, dict) else {"path": str(v)} for k, v in reports.items()},
        )

    @classmethod
    def from_yaml(cls, path: str) -> Pipeline:
        with open(path) as f:
            return cls.from_config(yaml.safe_load(f) or {})

    def apply(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        for step in self.steps:
            dataset = step(dataset)
        return dataset

    def run(
        self,
        dataset: ImageTextPairDataset | None = None,
        summary: Callable[[ImageTextPairDataset], None] | None = None,
    ) -> ImageTextPairDataset:
        """Opens the input (unless given), applies the steps, writes the reports, calls ``summary`` on the result,
        and exports; all of it on the pipeline's cluster, which is closed when this returns.

        When more than one thing reads the result (a report reads it twice), it is persisted first, so the steps run
        once.

        Returns:
            The exported dataset (read back from the new shards). Without an export, the final dataset; with a
            ``cluster`` its frame may refer to results held by that closed cluster, so to keep working on it, call
            :meth:`apply` under a client of your own instead.
        """
        with _cluster(self.cluster):
            if dataset is None:
                if not self.input:
                    raise ValueError("the config has no 'input' folder")
                dataset = ImageTextPairDataset.from_webdataset(
                    self.input, self.id_col, backend=self.backend, storage_options=self.options.get("storage_options")
                )
            dataset = self.apply(dataset)
            if self.reports or (self.export and summary is not None):
                dataset = dataset.persist(desc="computing the steps")
            for name, kwargs in self.reports.items():
                _load(REPORTS, "report", name)(dataset, **kwargs)
            if summary is not None:
                summary(dataset)
            if self.export:
                kwargs = dict(self.export)
                return dataset.to_webdataset(kwargs.pop("path"), **kwargs)
            return dataset


def run_config(path: str) -> ImageTextPairDataset:
    """Runs the pipeline described by a YAML file."""
    return Pipeline.from_yaml(path).run()
