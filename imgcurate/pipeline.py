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
import functools
import importlib
import importlib.util
import inspect
import posixpath
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from imgcurate import progress
from imgcurate.backends import backend_of, to_pandas
from imgcurate.config_check import bind, check_value, unknown_key
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.errors import ConfigError, MissingDependencyError, one_line
from imgcurate.steps.base import Step

__all__ = ["STAGES", "REPORTS", "Pipeline", "load_stage", "run_config", "stage_info"]

#: Step name -> "module:attribute". Modules are imported only when a step is used.
STAGES: dict[str, str] = {
    "SampleFilter": "imgcurate.filters:SampleFilter",
    "ImageSize": "imgcurate.filters:ImageSize",
    "TimmImageEmbedder": "imgcurate.embedders.timm:TimmImageEmbedder",
    "ClipEmbedder": "imgcurate.embedders.clip:ClipEmbedder",
    "CaptionFeatures": "imgcurate.text:CaptionFeatures",
    "ClipTextFilter": "imgcurate.text:ClipTextFilter",
    "AestheticClassifier": "imgcurate.classifiers.aesthetic:AestheticClassifier",
    "NsfwClassifier": "imgcurate.classifiers.nsfw:NsfwClassifier",
    "ExactDuplicates": "imgcurate.dedup.exact:ExactDuplicates",
    "SemanticDeduplicator": "imgcurate.dedup.semantic:SemanticDeduplicator",
}


#: Report name -> "module:function(dataset, path)", written by a pipeline's ``reports`` key.
REPORTS: dict[str, str] = {
    "duplicates": "imgcurate.reports.duplicates:duplicate_groups",
    "scores": "imgcurate.reports.scores:score_histograms",
}


def _load(table: dict[str, str], kind: str, name: str) -> Any:
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown {kind} {name!r}{hint}: choose one of {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_stage(name: str) -> type:
    """The step class registered under ``name``, or named by a dotted path ``package.module:Class``.

    Raises:
        ConfigError: unknown name (listing the valid ones), or a dotted path that does not name a step class.
    """
    if ":" not in name:
        return _load(STAGES, "step", name)
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as err:  # noqa: BLE001 - missing, a relative or empty name, or a module that fails as it loads
        raise ConfigError(f"step {name!r}: cannot import it ({type(err).__name__}: {err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise ConfigError(f"step {name!r} is not a subclass of imgcurate.steps.Step")
    return cls


def stage_summary(name: str) -> str:
    """The first line of a step's docstring."""
    try:
        doc = inspect.getdoc(load_stage(name)) or ""
    except ImportError as err:  # a step whose optional dependency is missing still gets listed
        return f"(unavailable: {err})"
    return _plain_text(doc.splitlines()[0]) if doc else ""


#: reStructuredText roles (``:class:`~imgcurate.filters.Rule```) and literals (````keep````), as plain text.
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def _plain_text(line: str) -> str:
    line = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), line)
    return _LITERAL.sub(r"\1", line)


def stage_info(name: str) -> dict[str, Any]:
    """What ``imgcurate stages --verbose`` shows of a step: summary, parameters (default and type, from the
    constructor's signature), GPU use (the class's ``gpu``), and its optional packages with whether each is installed
    here. A step whose module cannot be imported (a missing optional package) is listed with ``available: false``."""
    try:
        cls = load_stage(name)
    except ImportError as err:
        return {"name": name, "summary": "", "available": False, "error": str(err), "gpu": None,
                "requires": [], "parameters": []}  # fmt: skip
    requires = [
        {"module": r.module, "package": r.package, "extra": r.extra, "installed": r.installed()}
        for r in getattr(cls, "requires", ())
    ]
    parameters = []
    for pname, param in inspect.signature(cls).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = param.annotation
        if annotation is param.empty:
            annotation = ""
        elif not isinstance(annotation, str):
            annotation = inspect.formatannotation(annotation)
        entry: dict[str, Any] = {"name": pname, "type": annotation, "required": param.default is param.empty}
        if param.default is not param.empty:
            default = param.default
            plain = (type(None), bool, int, float, str)
            if isinstance(default, tuple | list) and all(isinstance(v, plain) for v in default):
                default = list(default)  # as YAML writes it: drop_duplicates: []
            entry["default"] = default if isinstance(default, (*plain, list)) else repr(default)
        parameters.append(entry)
    return {
        "name": name,
        "summary": stage_summary(name),
        "available": all(r["installed"] for r in requires),
        "gpu": getattr(cls, "gpu", "no"),
        "requires": requires,
        "parameters": parameters,
    }


def _is_step_spec(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str) and (
        next(iter(value)) in STAGES or ":" in next(iter(value))
    )  # fmt: skip


def build_step(spec: Any, where: str = "steps") -> Step:
    """A step from its config entry ``{Name: {arguments}}``; lists of such entries inside the arguments (an
    embedder's ``classifiers``) are built too. Every argument is checked against the constructor first.

    Raises:
        ConfigError: the entry is malformed, names no step, or an argument is unknown, missing or of the wrong type.
        MissingDependencyError: the step needs a package that is not installed.
    """
    if not _is_step_spec(spec) and not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"{where}: a step is written as 'Name: {{arguments}}', got {spec!r}")
    ((name, kwargs),) = spec.items()
    cls = load_stage(str(name))
    where = f"{where}.{name}"
    kwargs = dict(kwargs or {}) if isinstance(kwargs, dict) or kwargs is None else kwargs
    if isinstance(kwargs, dict):
        for key, value in kwargs.items():
            if isinstance(value, list) and value and all(_is_step_spec(v) for v in value):
                kwargs[key] = [build_step(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
    bind(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except (ConfigError, MissingDependencyError):
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a user's step that fails as it is built: named, in one line
        raise ConfigError(f"{where}: could not be built ({type(err).__name__}: {err})") from None


#: LocalCluster options besides its own parameters: those it passes to each worker.
_WORKER_OPTIONS = ("memory_limit", "local_directory", "resources", "env", "preload", "nthreads")


def _cluster_options(kind: str) -> list[str]:
    from distributed import LocalCluster

    def named(function: Callable) -> list[str]:
        params = inspect.signature(function).parameters
        return [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]

    local = named(LocalCluster.__init__) + list(_WORKER_OPTIONS)
    if kind != "cuda":
        return local
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise MissingDependencyError("cluster type 'cuda'", "dask-cuda", extra="gpu") from err
    # LocalCUDACluster hands the options it does not name to LocalCluster (a dashboard address, a host)
    return list(dict.fromkeys(named(LocalCUDACluster.__init__) + local))


def check_cluster(spec: Any) -> dict[str, Any] | None:
    """Checks a ``cluster`` section: ``{address: ...}``, or ``{type: local|cuda, <LocalCluster options>}``.

    Raises:
        ConfigError: naming the key and value at fault.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"cluster: expected 'key: value' options, got {spec!r}")
    spec = dict(spec)
    if "address" in spec:
        extra = sorted(set(spec) - {"address"})
        if extra:
            raise ConfigError(f"cluster: 'address' connects to a running scheduler and takes no other key ({extra})")
        if not isinstance(spec["address"], str):
            raise ConfigError(f"cluster.address: expected a string, got {spec['address']!r}")
        return spec
    kind = spec.get("type", "local")
    if kind not in ("local", "cuda"):
        raise ConfigError(f"cluster.type: expected 'local' or 'cuda', got {kind!r}")
    known = _cluster_options(kind)
    for key in spec:
        if key != "type" and key not in known:
            raise unknown_key("cluster", key, known + ["type", "address"])
    for key, expected in (("n_workers", int), ("threads_per_worker", int), ("processes", bool)):
        if key in spec and (not isinstance(spec[key], expected) or isinstance(spec[key], bool) != (expected is bool)):
            raise ConfigError(f"cluster.{key}: {check_value(spec[key], expected)}, got {spec[key]!r}")
    for key in ("n_workers", "threads_per_worker"):
        if key in spec and spec[key] < 1:
            raise ConfigError(f"cluster.{key}: expected at least 1, got {spec[key]!r}")
    _check_cluster_values(spec)
    return spec


#: The least memory limit a worker is given (0 is no limit): distributed restarts a worker over its limit, so a few
#: bytes (a fraction such as 1.5 is read as 1 byte) would restart every worker without end.
_LEAST_MEMORY_LIMIT = 1 << 26


def _check_memory_limit(limit: Any, parse_bytes: Callable[[str], int]) -> None:
    """``cluster.memory_limit``: ``auto``, a fraction of the machine's memory in (0, 1], or bytes (an integer or
    ``'4GiB'``): 0 for none, else at least 64 MiB."""
    problem = f"expected bytes ('4GiB', at least 64MiB; 0 for no limit), a fraction in (0, 1] or 'auto', got {limit!r}"
    if limit is None or limit == "auto":
        return
    if isinstance(limit, str):
        try:
            limit = parse_bytes(limit)
        except ValueError:
            raise ConfigError(f"cluster.memory_limit: {problem}") from None
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise ConfigError(f"cluster.memory_limit: {problem}")
    if isinstance(limit, float) and not limit.is_integer():
        if not 0 < limit <= 1:
            raise ConfigError(f"cluster.memory_limit: {problem}")
    elif limit != 0 and not (limit == 1 or limit >= _LEAST_MEMORY_LIMIT):
        raise ConfigError(f"cluster.memory_limit: {problem}")


def _check_cluster_values(spec: dict[str, Any]) -> None:
    """The values of the LocalCluster options that a YAML file most often gets wrong; others are checked when the
    cluster starts (:func:`_cluster` names the section then)."""
    import os

    from dask.utils import parse_bytes

    env = spec.get("env")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) for k in env)):
        raise ConfigError(f"cluster.env: expected 'NAME: value' environment variables, got {env!r}")
    if spec.get("type") == "cuda" and env and "CUDA_VISIBLE_DEVICES" in env:
        raise ConfigError("cluster.env: dask-cuda sets CUDA_VISIBLE_DEVICES for each worker (one GPU each); choose "
                          "the GPUs with cluster.CUDA_VISIBLE_DEVICES instead")  # fmt: skip
    for key in ("local_directory", "host"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(f"cluster.{key}: expected a string, got {spec[key]!r}")
    dashboard = spec.get("dashboard_address")
    if dashboard is not None and (
        isinstance(dashboard, bool)
        or not isinstance(dashboard, str | int)
        or (isinstance(dashboard, int) and not 0 <= dashboard < 65536)
    ):
        raise ConfigError(f"cluster.dashboard_address: expected an address (':8787') or a port, got {dashboard!r}")
    port = spec.get("scheduler_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
        raise ConfigError(f"cluster.scheduler_port: expected a port number (0 for any), got {port!r}")
    _check_memory_limit(spec.get("memory_limit"), parse_bytes)
    folder = spec.get("local_directory")
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"cluster.local_directory: {folder} is a file, not a folder")


def cuda_cluster_options(spec: dict[str, Any]) -> dict[str, Any]:
    """LocalCUDACluster options with one memory pool per GPU: RMM's asynchronous allocator (``rmm_async``), handed to
    torch and CuPy on every worker (``rmm_allocator_external_lib_list``), unless the config chooses its own RMM setup.
    Otherwise RMM (cuDF), torch and CuPy would each keep a pool of their own and starve one another. DALI still keeps
    its own pool (not configured here)."""
    spec = dict(spec)
    if not any(key in spec for key in ("rmm_pool_size", "rmm_managed_memory", "rmm_async")):
        spec["rmm_async"] = True
    if "rmm_allocator_external_lib_list" not in spec:
        libs = [lib for lib in ("torch", "cupy") if importlib.util.find_spec(lib) is not None]
        if spec.get("rmm_async") or spec.get("rmm_pool_size") is not None or spec.get("rmm_managed_memory"):
            spec["rmm_allocator_external_lib_list"] = libs or None
    return spec


def with_worker_env(specs: dict[Any, dict], env: dict[str, Any]) -> dict[Any, dict]:
    """Worker specs (``SpecCluster.new_worker_spec``'s ``{name: {"cls": ..., "options": {...}}}``) with ``env`` in
    each worker's environment, under what the spec sets itself (dask-cuda's ``CUDA_VISIBLE_DEVICES``)."""
    out = {}
    for name, spec in specs.items():
        options = dict(spec.get("options", {}))
        options["env"] = {**{k: str(v) for k, v in env.items()}, **(options.get("env") or {})}
        out[name] = {**spec, "options": options}
    return out


def _cuda_cluster(options: dict[str, Any]) -> Any:
    """dask-cuda's LocalCUDACluster with ``options``. Its workers' environment is its own ``CUDA_VISIBLE_DEVICES``
    only (it replaces the ``env`` option), so a config's ``env`` is added to each worker's spec here."""
    from dask_cuda import LocalCUDACluster

    options = dict(options)
    env = options.pop("env", None) or {}

    class CUDAClusterWithEnv(LocalCUDACluster):
        def new_worker_spec(self) -> dict:
            return with_worker_env(super().new_worker_spec(), env)

    return CUDAClusterWithEnv(**options)


@contextlib.contextmanager
def _cluster(spec: dict | None, steps: list[Any] = (), backend: str = "pandas") -> Iterator[Any]:
    if not spec:
        client = progress.distributed_client()  # one the caller made: checked as a cluster given by its address
        if client is not None:
            check_workers(client, list(steps), backend)
        yield None
        return
    from distributed import Client, LocalCluster

    from imgcurate.cpu import local_cluster_kwargs

    spec = dict(spec)
    if "address" in spec:
        with connect(spec["address"]) as client:
            check_workers(client, list(steps), backend)
            yield client
        return
    kind = spec.pop("type", "local")
    tasks_here = False
    try:
        if kind == "cuda":
            cluster = _cuda_cluster(cuda_cluster_options(spec))
        else:
            kwargs = local_cluster_kwargs(spec)  # one 1-thread worker per core, malloc settings
            tasks_here = kwargs.get("processes", True) is False
            cluster = LocalCluster(**kwargs)
    except (RuntimeError, ValueError, TypeError, OSError) as err:  # an option's value it could not start with
        from imgcurate.errors import ClusterError

        raise ClusterError(f"cluster: the local cluster did not start with these options ({one_line(err)})") from None
    # The scheduler builds each graph in this process; with the tasks in worker processes, this process does only
    # graph work, so the collector waits between passes for the cluster's lifetime (as ``dask scheduler`` does).
    with contextlib.nullcontext() if tasks_here else progress.GraphGC(), _quiet_shuffles(), cluster, \
            Client(cluster) as client:  # fmt: skip
        yield client


@contextlib.contextmanager
def _quiet_shuffles() -> Iterator[None]:
    """The scheduler of a cluster the run starts runs in this process, and distributed's p2p shuffle plugin logs a
    warning when each shuffle starts and ends (a report's ``nunique`` is one): normal operation, not for the run's
    output. Its real errors still show."""
    import logging

    logger = logging.getLogger("distributed.shuffle._scheduler_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def connect(address: str) -> Any:
    """A client of the running scheduler at ``address``.

    Raises:
        ClusterError: no scheduler answered there (within distributed's connect timeout).
    """
    import dask
    from distributed import Client

    from imgcurate.errors import ClusterError

    try:
        return Client(address)
    except (OSError, TimeoutError) as err:  # distributed raises OSError after its connect timeout
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        raise ClusterError(f"cluster.address: no Dask scheduler answered at {address} within {timeout} "
                           f"({type(err).__name__})") from None  # fmt: skip


def _missing_modules(modules: list[str]) -> list[str]:
    """On a worker: the modules of ``modules`` that do not import there."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - missing, or broken on import: either way the worker cannot run the step
            missing.append(module)
    return missing


def _resource_problems(steps: list[Any]) -> list[str]:
    """On a worker: what each step's :meth:`~imgcurate.steps.Step.check_resources` finds missing there."""
    from imgcurate.errors import ImgcurateError

    problems = []
    for step in steps:
        try:
            step.check_resources()
        except ImgcurateError as err:
            problems.append(str(err))
        problems += step.device_problems()
    return problems


def _identity_function() -> Callable[[], tuple[str, str]]:
    """The function that says which imgcurate a process runs: its version, and a digest of its source files (their
    paths and bytes), which tells two checkouts of one version apart. Made here, not at module level, so that it
    travels to a worker by value and runs on a worker with another imgcurate too."""

    def identity() -> tuple[str, str]:
        import hashlib
        import os

        import imgcurate

        root = os.path.dirname(os.path.abspath(imgcurate.__file__))
        digest = hashlib.sha256()
        for folder, dirs, files in os.walk(root):
            # hidden folders and files (an editor's lock file, a notebook's checkpoints) are not imgcurate's
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith((".py", ".yaml")) and not name.startswith(".") and os.path.isfile(path):
                    with open(path, "rb") as f:
                        digest.update(f"{os.path.relpath(path, root)}\0".encode() + hashlib.sha256(f.read()).digest())
        return imgcurate.__version__, digest.hexdigest()

    return identity


@functools.cache
def code_identity() -> tuple[str, str]:
    """This process's imgcurate: its version and a digest of its source files (see :func:`_identity_function`)."""
    return _identity_function()()


def _run_check(run: Callable[..., Any], where: str, *args: Any) -> Any:
    """One of :func:`check_workers`' calls on the cluster; a failure to run it there (imgcurate itself missing, a
    step's module missing while the steps are unpickled) is a one-line ClusterError."""
    from imgcurate.errors import ClusterError

    try:
        return run(*args)
    except Exception as err:  # noqa: BLE001 - whatever the remote side raised: it could not run the check
        raise ClusterError(f"cluster: {where} could not run imgcurate's checks ({type(err).__name__}: "
                           f"{one_line(err)}); "
                           "install imgcurate and the steps' modules where it runs") from None  # fmt: skip


def check_workers(client: Any, steps: list[Any], backend: str = "pandas") -> None:
    """Before any work on a cluster that the pipeline did not start (``cluster: {address: ...}``, or a distributed
    client made before the run): every worker runs the same imgcurate as this process (version and source files),
    imports each step's module (those of the steps among its arguments too) and the packages it uses there
    (:meth:`Step.worker_requirements`, for a metadata frame of ``backend``), and finds what it loads
    (:meth:`Step.check_resources`); the scheduler, which unpickles the task graph, imports the steps' modules. Its
    workers run elsewhere, maybe in another environment: without this check a missing package or weights file is a
    task's error in the middle of a pass, and another imgcurate gives other results without a word.

    Raises:
        ClusterError: naming the module, the missing resource or the other version, and on how many of the workers.
    """
    from imgcurate.errors import ClusterError

    steps = [s for s in steps if isinstance(s, Step)]
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    if not steps or not workers:
        return
    graph: dict[str, str] = {"imgcurate": "every step"}  # what unpickling the steps imports
    needed: dict[str, str] = {}
    if backend == "cudf":  # every partition the workers hold is a cuDF frame of a dask_cudf collection
        needed.update(cudf="the cudf backend (pip install cudf-cu13)", dask_cudf="the cudf backend (pip install "
                      "dask-cudf-cu13)")  # fmt: skip
    for step in steps:
        for inner in [step, *step.inner_steps()]:
            graph.setdefault(type(inner).__module__, f"the step {step.name}")
        for owner in [step, *(s for s in step.inner_steps() if isinstance(s, Step))]:
            for requirement in owner.worker_requirements(backend):
                needed.setdefault(requirement.module, f"{step.name} (pip install {requirement.package})")
    mine = code_identity()
    others = [tuple(theirs) for theirs in _run_check(client.run, "a worker", _identity_function()).values()]
    differ = [theirs for theirs in others if theirs != mine]
    if differ:
        versions = sorted({v for v, _ in differ} - {mine[0]})
        what = f"version {', '.join(versions)}" if versions else "the same version from other source files"
        raise ClusterError(f"cluster: {len(differ)} of {workers} workers run another imgcurate ({what}) than this "
                           f"process (version {mine[0]}): install the same one where the workers run, so that every "
                           "shard is computed by the same code")  # fmt: skip
    needed = {**graph, **needed}
    found = _run_check(client.run, "a worker", _missing_modules, sorted(needed))
    for module in sorted({m for missing in found.values() for m in missing}):
        count = sum(module in missing for missing in found.values())
        raise ClusterError(f"cluster: {count} of {workers} workers cannot import {module!r}, which {needed[module]} "
                           "needs: install it where the workers run (or put it on their PYTHONPATH)")  # fmt: skip
    missing = _run_check(client.run_on_scheduler, "the scheduler", _missing_modules, sorted(graph))
    if missing:
        raise ClusterError(f"cluster: the scheduler cannot import {missing[0]!r}, which {graph[missing[0]]} needs (it "
                           "unpickles the task graph): install it where the scheduler runs (or put it on its "
                           "PYTHONPATH)")  # fmt: skip
    found = _run_check(client.run, "a worker", _resource_problems, steps)
    for problem in sorted({p for problems in found.values() for p in problems}):
        count = sum(problem in problems for problems in found.values())
        raise ClusterError(f"cluster: on {count} of {workers} workers: {problem}")


_KNOWN_KEYS = {
    "input": str,
    "output": str,
    "id_col": str,
    "backend": str,
    "cluster": dict,
    "steps": list,
    "reports": dict,
    "export": dict,
    "storage_options": dict,
    "run_dir": str,
    "report": bool,
}


@dataclass
class Pipeline:
    """Steps applied in order to a dataset, then reports and an optional export.

    Args:
        steps: :class:`~imgcurate.steps.Step` objects (or any ``dataset -> dataset`` callables).
        export: keyword arguments of :meth:`ImageTextPairDataset.to_webdataset` (``path`` among them), or None.
            Without ``filter_column``, the export keeps the rows that the pipeline's filter keeps: the ``keep`` column
            of the one step that writes one (a :class:`~imgcurate.filters.SampleFilter`); with several such steps,
            name the column; ``filter_column: null`` (None) exports every row.
        input: the input folder, opened by :meth:`run` when no dataset is given.
        id_col: the key column of the input.
        backend: ``auto``, ``pandas`` or ``cudf``.
        cluster: ``{address: ...}`` or LocalCluster options (``type: cuda`` for dask-cuda's LocalCUDACluster).
        storage_options: passed to fsspec for the input, the reports and the run directory. The export's own
            ``storage_options`` (an argument of :meth:`ImageTextPairDataset.to_webdataset`), when given, are used for
            the export folder and for the run directory beside it (the default run directory). A ``run_dir`` given
            takes the options of the export or else of the input that is on its kind of filesystem, and none (the
            environment's credentials) when neither is.
        reports: report name (see :data:`REPORTS`) -> its keyword arguments, ``path`` (the file to write) among
            them; written after the steps and before the export. In YAML a bare path stands for ``{path: ...}``.
        run_dir: the run directory (:mod:`imgcurate.rundir`): each step's columns are written there shard by shard
            and a rerun reuses what is done. None with an export means ``<export path>.run``; None without one
            keeps the results in memory.
        report: write the run report (``report.html``) into the run directory at the end of the run.
    """

    steps: list[Any]
    export: dict[str, Any] | None = None
    input: str | None = None
    id_col: str = "key"
    backend: str | None = None
    cluster: dict[str, Any] | None = None
    storage_options: dict[str, Any] | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_dir: str | None = None
    report: bool = True

    def __post_init__(self):
        self.cluster = check_cluster(self.cluster)
        for name, kwargs in self.reports.items():  # an unknown report or argument is an error before any work
            if not isinstance(kwargs.get("path"), str) or not kwargs["path"]:
                raise ConfigError(f"reports.{name}: give the file to write as 'path'")
            bind(_load(REPORTS, "report", name), kwargs, f"reports.{name}", skip=1)
        if self.export is not None:
            from imgcurate.dataset import ImageTextPairDataset
            from imgcurate.io.export import check_sizes

            if "filter_column" not in self.export:
                self._keep_column()  # several keep columns and none named: an error now, not at the run
            bind(ImageTextPairDataset.to_webdataset, self.export, "export", skip=1)
            try:
                check_sizes(self.export.get("samples_per_shard", 1), self.export.get("max_shards"))
            except ValueError as err:
                raise ConfigError(f"export: {err}") from None

    def _export_settings(self) -> dict[str, Any] | None:
        """The export's arguments with its filter column settled: the one given (None exports every row), else the
        keep column of the pipeline's filter (:meth:`_keep_column`). Read where it is used, so that an export set
        after construction (``imgcurate run --output``) gets the same default."""
        if self.export is None:
            return None
        if "filter_column" in self.export:
            return dict(self.export)
        return {**self.export, "filter_column": self._keep_column()}

    def _keep_column(self) -> str | None:
        """The ``keep`` column of the one step that writes one (the export's default filter column); None without
        such a step. Several are a :class:`ConfigError`: which of them selects the export is the config's to say."""
        found = [(step.name, step.summary_columns()["keep"]) for step in self.steps
                 if isinstance(step, Step) and "keep" in step.summary_columns()]  # fmt: skip
        if len(found) > 1:
            named = ", ".join(f"{column!r} ({name})" for name, column in found)
            raise ConfigError(f"export: several steps write a keep column ({named}): name the one that selects the "
                              "export as filter_column (null exports every row)")  # fmt: skip
        return found[0][1] if found else None

    @property
    def options(self) -> dict[str, Any]:
        """Kept for callers of earlier versions: ``{"storage_options": ...}``."""
        return {"storage_options": self.storage_options}

    @classmethod
    def from_config(cls, config: Any) -> Pipeline:
        """A pipeline from a parsed YAML mapping, every section checked before anything runs.

        Raises:
            ConfigError: one line naming the key and the value at fault.
            MissingDependencyError: a step needs a package that is not installed.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"a pipeline config is a mapping of sections, got {type(config).__name__}")
        for key, value in config.items():
            if key not in _KNOWN_KEYS:
                raise unknown_key("config", str(key), list(_KNOWN_KEYS))
            expected = _KNOWN_KEYS[key]
            if value is not None and not isinstance(value, expected):
                raise ConfigError(f"{key}: {check_value(value, expected)}, got {value!r}")
        if config.get("backend") not in (None, "auto", "pandas", "cudf"):
            raise ConfigError(f"backend: expected auto, pandas or cudf, got {config['backend']!r}")
        reports = config.get("reports") or {}
        for name, value in reports.items():
            if not (isinstance(value, dict) or (isinstance(value, str) and value)):
                raise ConfigError(f"reports.{name}: give the file to write (a path, or path: ...), got {value!r}")
        export = dict(config.get("export") or {})
        if config.get("output"):
            if export.get("path") not in (None, config["output"]):
                raise ConfigError(f"output: {config['output']} and export.path: {export['path']} name two folders: "
                                  "give one of them")  # fmt: skip
            export.setdefault("path", config["output"])
        if export and not export.get("path"):
            raise ConfigError("export: give the folder to write as 'path' (or a top-level 'output')")
        return cls(
            steps=[build_step(s, f"steps[{i}]") for i, s in enumerate(config.get("steps") or [])],
            export=export if export.get("path") else None,
            input=config.get("input"),
            id_col=config.get("id_col", "key"),
            backend=config.get("backend"),
            cluster=config.get("cluster"),
            storage_options=config.get("storage_options"),
            reports={str(k): dict(v) if isinstance(v, dict) else {"path": str(v)} for k, v in reports.items()},
            run_dir=config.get("run_dir"),
            report=config.get("report", True),
        )

    @classmethod
    def from_yaml(cls, path: str) -> Pipeline:
        """:meth:`from_config` on a YAML file; its errors name the file."""
        config = read_config(path)
        try:
            return cls.from_config(config)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def open_input(self, validate: bool = True) -> ImageTextPairDataset:
        """Opens the ``input`` folder (reads the parquet footers and tar headers, no image); ``validate=False`` reads
        only what the schema needs (the checks of ``estimate`` and ``doctor``, which run no step)."""
        if not self.input:
            raise ConfigError("input: the config has no 'input' folder")
        return ImageTextPairDataset.from_webdataset(
            self.input, self.id_col, backend=self.backend, storage_options=self.storage_options, validate=validate
        )

    def check(self, dataset: ImageTextPairDataset) -> None:
        """Checks the column flow on the dataset's ``meta``: every step finds the columns it reads, and the export's
        filter column exists and is boolean at the end; and each step's need of rows against the input's row count
        (:meth:`Step.check_rows`). Nothing is computed.

        Raises:
            ConfigError: naming the step (or export key) and the column.
        """
        meta, id_col = dataset.metadata._meta, dataset.id_col
        read = set(map(str, meta.columns))
        self._warn_upstream()
        written: dict[str, str] = {}  # column -> the step that writes it
        for i, step in enumerate(self.steps):
            if not isinstance(step, Step):
                continue
            where = f"steps[{i}].{step.name}"
            try:
                step.check(meta, id_col)
                if dataset.input_rows is not None:
                    step.check_rows(dataset.input_rows)
            except ValueError as err:  # a step's own message may name it already
                message = str(err).removeprefix(f"{step.name}: ")
                raise ConfigError(f"{where}: {message}") from None
            for column in step.output_columns():  # the key column is Step.check's
                if column in written:
                    raise ConfigError(f"{where}: writes the column {column!r}, which {written[column]} writes too, "
                                      "so the earlier result would be lost: give one of them another name")  # fmt: skip
                if column in read:  # curating an export again replaces its columns; a caption replaced is a mistake
                    warnings.warn(f"{where}: replaces the input's column {column!r}", stacklevel=2)
                written[column] = where
            meta = zip_columns_meta(meta, step.output_meta(meta))
        columns = list(map(str, meta.columns))
        column = (self._export_settings() or {}).get("filter_column")
        if column is not None:
            if column not in columns:
                raise ConfigError(f"export.filter_column: no column {column!r} at the end of the steps "
                                  f"(columns: {', '.join(columns)})")  # fmt: skip
            kind = to_pandas(meta[[column]])[column].dtype
            if not pd.api.types.is_bool_dtype(kind):
                raise ConfigError(f"export.filter_column: {column!r} holds {kind} at the end of the steps, not "
                                  "booleans")  # fmt: skip
        old_id_col = (self.export or {}).get("old_id_col")
        if old_id_col is not None and old_id_col in columns:
            raise ConfigError(f"export.old_id_col: {old_id_col!r} is already a column at the end of the steps (the "
                              "export would have to replace it): give the old keys another column name")  # fmt: skip
        self._check_report_columns(columns)

    def _warn_upstream(self) -> None:
        """Warns with what each step finds doubtful in the steps before it (:meth:`Step.upstream_warnings`: a filter
        preset set on another CLIP model's scores); needs no input."""
        writers: dict[str, Step] = {}  # column -> the last step that writes it
        for i, step in enumerate(self.steps):
            if not isinstance(step, Step):
                continue
            for message in step.upstream_warnings(writers):
                warnings.warn(f"steps[{i}].{step.name}: {message}", stacklevel=3)
            writers.update(dict.fromkeys(step.output_columns(), step))

    def _check_report_columns(self, columns: list[str]) -> None:
        """The columns each report reads are there at the end of the steps."""
        import inspect

        if "duplicates" in self.reports:
            from imgcurate.reports.duplicates import find_dedup_columns

            given = self.reports["duplicates"].get("columns")
            if not given:
                try:
                    find_dedup_columns(columns)
                except ValueError as err:
                    raise ConfigError(f"reports.duplicates: {err}") from None
            else:
                if isinstance(given, str) or len(given) != 3 or None in given[:2]:
                    raise ConfigError(
                        "reports.duplicates.columns: give three columns: the duplicate flag, the "
                        f"duplicate-of column and the similarity column (or null), not {given!r}"
                    )
                missing = [c for c in given if c is not None and c not in columns]
                if missing:
                    raise ConfigError(f"reports.duplicates.columns: no column {', '.join(map(repr, missing))} at the "
                                      "end of the steps")  # fmt: skip
        if "scores" in self.reports:
            from imgcurate.reports.scores import score_histograms

            defaults = inspect.signature(score_histograms).parameters
            kwargs = self.reports["scores"]
            wanted = kwargs.get("columns", defaults["columns"].default)
            reason = kwargs.get("reason_column", defaults["reason_column"].default)
            unknown = [c for c in kwargs.get("thresholds") or {} if c not in wanted]
            if unknown:
                raise ConfigError(f"reports.scores.thresholds: {', '.join(map(repr, unknown))} is not one of the "
                                  f"report's columns ({', '.join(map(repr, wanted))})")  # fmt: skip
            if not any(c in columns for c in wanted) and reason not in columns:
                raise ConfigError(
                    f"reports.scores: none of the columns {', '.join(map(repr, wanted))} (nor "
                    f"{reason!r}) is there at the end of the steps: name the scores in 'columns'"
                )

    def check_config(self, dataset: ImageTextPairDataset | None, devices: bool = True) -> None:
        """The checks of the config that need neither an image nor a cluster, as :meth:`run` makes them before any
        work: the column flow on the dataset's ``meta`` (:meth:`check`; skipped when ``dataset`` is None, an input
        that cannot be read here) and the places it writes (:meth:`_check_paths`). ``imgcurate estimate`` and
        ``imgcurate doctor`` make these same checks, so a config they accept is one that ``run`` accepts. With
        ``devices``, a GPU a step is told to use must be usable (:meth:`device_problems`; the doctor lists those
        problems among the rest instead).

        Raises:
            ConfigError: naming the key, step or column at fault.
        """
        if dataset is not None:
            self.check(dataset)
        else:
            self._warn_upstream()
        self._check_paths(dataset.path if dataset is not None else self.input)
        problems = self.device_problems() if devices else []
        if problems:
            raise ConfigError(problems[0])

    def _tasks_here(self) -> bool:
        """Whether the run's tasks run on this machine: no cluster, or one the run starts (not one given by its
        address, nor a distributed client made before the run, whose workers may be anywhere)."""
        if self.cluster:
            return "address" not in self.cluster
        return progress.distributed_client() is None

    def device_problems(self) -> list[str]:
        """Why a step told to use a GPU (``device: cuda``) cannot use one here, when the run's tasks run on this
        machine (no cluster, or one the run starts); none for a cluster given by its address (or a client made
        before the run), whose workers check themselves (:func:`check_workers`)."""
        if not self._tasks_here():
            return []
        return [f"steps[{i}].{problem}" for i, step in enumerate(self.steps) if isinstance(step, Step)
                for problem in step.device_problems()]  # fmt: skip

    def _check_paths(self, input_path: str | None = None) -> None:
        """The export folder and the run directory are folders (no part of their paths is a file), and each report
        file's folder exists (local files)."""
        import os

        import fsspec

        from imgcurate.io._fs import in_the_way, task_url

        so = self.storage_options or {}
        options = {"input": so, "export.path": self._export_options(), "run_dir": self._run_dir_options()}
        for key, folder in (("export.path", (self.export or {}).get("path")), ("run_dir", self.resolved_run_dir())):
            if folder:
                fs, root = fsspec.core.url_to_fs(str(folder), **options[key])
                found = in_the_way(fs, root)
                if found is not None:
                    blocked, what = found
                    if blocked == root.rstrip("/"):
                        raise ConfigError(f"{key}: {folder} is {what}, not a folder")
                    raise ConfigError(f"{key}: {folder} cannot be made: {task_url(fs, blocked)} is {what}, not a "
                                      "folder")  # fmt: skip
        for name, kwargs in self.reports.items():
            folder = os.path.dirname(os.path.abspath(os.path.expanduser(str(kwargs["path"]))))
            if "://" not in str(kwargs["path"]) and not os.path.isdir(folder):
                raise ConfigError(f"reports.{name}.path: the folder {folder} does not exist")
        self._check_overlaps(input_path or self.input)
        if _worker_processes(self.cluster):
            from imgcurate.io._fs import process_local

            paths = [("input", self.input), ("export.path", (self.export or {}).get("path")),
                     ("run_dir", self.resolved_run_dir())]  # fmt: skip
            for key, path in paths:
                if path and process_local(fsspec.core.url_to_fs(str(path), **options[key])[0]):
                    raise ConfigError(f"{key}: {path} is in this process's memory, which the cluster's worker "
                                      "processes do not share: use a filesystem they all reach, or a cluster with "
                                      "processes: false")  # fmt: skip

    def _check_overlaps(self, input_path: str | None) -> None:
        """No place the run writes is a place it reads or another place it writes: a report is not named like a file
        of the datasets in the input and export folders (a shard, its index, the export's manifest), nor like one of
        the run directory's own files, nor over an existing file that is not a report (:func:`check_replaceable`);
        the run directory is neither the input nor the export folder, and the export folder is not the input folder."""
        import fsspec

        from imgcurate.io._fs import same_folder, within
        from imgcurate.io.export import INCOMPLETE_MARKER, MANIFEST
        from imgcurate.reports._html import REPORT_STARTS, check_replaceable
        from imgcurate.rundir import FINISHED

        so = self.storage_options or {}

        def place(path: Any, options: dict | None = None) -> tuple[Any, str] | None:
            return fsspec.core.url_to_fs(str(path), **(so if options is None else options)) if path else None

        run_dir = self.resolved_run_dir()
        folders = {"the input folder": place(input_path),
                   "the export folder": place((self.export or {}).get("path"), self._export_options())}  # fmt: skip
        run = place(run_dir, self._run_dir_options())
        source, target = folders.values()
        if source and target and type(source[0]) is type(target[0]) and same_folder(target[0], target[1], source[1]):
            raise ConfigError(f"export.path: {self.export['path']} is the input folder: export into a folder of its "
                              "own")  # fmt: skip
        for what, found in folders.items():
            if found and run and type(found[0]) is type(run[0]) and same_folder(run[0], run[1], found[1]):
                raise ConfigError(f"run_dir: {run_dir} is {what}: give the run directory a folder of its own")
        written: dict[tuple, str] = {}
        for name, kwargs in self.reports.items():
            fs, path = place(kwargs["path"])
            where = (type(fs).__name__, posixpath.normpath(path))
            if where in written:
                raise ConfigError(f"reports.{name}.path: {kwargs['path']} is the file of reports.{written[where]} "
                                  "too: give each report a file of its own")  # fmt: skip
            written[where] = name
            base = posixpath.basename(path.rstrip("/"))
            dataset_file = base.endswith((".tar", ".parquet", ".idx")) or base in (MANIFEST, INCOMPLETE_MARKER)
            for what, found in folders.items():
                if dataset_file and found and type(found[0]) is type(fs) and within(fs, path, found[1]):
                    raise ConfigError(f"reports.{name}.path: {kwargs['path']} is named like a file of the dataset "
                                      f"in {what}: give the report another name")  # fmt: skip
            if run and type(run[0]) is type(fs) and within(fs, path, run[1]):
                inner = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(run[1]))
                if inner in ("run.json", *FINISHED) or inner.split("/")[0] == "steps":
                    raise ConfigError(f"reports.{name}.path: {kwargs['path']} is one of the run directory's own "
                                      "files: give the report another name")  # fmt: skip
            try:
                check_replaceable(str(kwargs["path"]), so, REPORT_STARTS, "a report")
            except FileExistsError as err:
                raise ConfigError(f"reports.{name}.path: {err}") from None

    def _published_export(self, described: dict[str, Any] | None) -> bool:
        """Whether this same run (the run directory's ``run.json`` is ``described``) already published its export,
        and the export folder still holds exactly that export, whole: its manifest (with its digest of the shards'
        parquet footers) has the digest recorded in ``exported.json``, and every shard it lists is there. A rerun
        after a stop between the export and the end of the run then finishes without exporting again, and without
        ``--overwrite``; with ``--overwrite`` it exports again (what repairs a damaged export folder)."""
        from imgcurate.io.export import manifest_digest

        recorded = self._record_of_this_run(described, "exported.json")  # --overwrite: None, write it again
        if recorded is None:
            return False
        digest = manifest_digest(str(self.export["path"]), self._export_options())
        if not (isinstance(recorded, dict) and digest is not None and recorded.get("manifest") == digest):
            return False
        try:  # the manifest is this export's: its shards must all still be there
            self._open_export()
        except (OSError, ValueError):
            return False
        return True

    def _export_begun(self, described: dict[str, Any] | None) -> bool:
        """Whether this same run began its export into the same folder and was stopped before recording it as
        published (``exporting.json`` without ``exported.json``; it is written once the export found the folder fit
        to write, so an export refused the folder leaves none): the folder then holds what this run was allowed to
        replace when it began (no shards, or ``--overwrite`` was given), or this run's export, published in part or
        whole. Either way the rerun may write it again without ``--overwrite``."""
        begun = self._record_of_this_run(described, "exporting.json")
        if not isinstance(begun, dict):  # none recorded (or no export: nothing to begin)
            return False
        if self._record_of_this_run(described, "exported.json") is not None:
            return False  # recorded as published (a stop left the mark): not published now, so another run's there
        return begun.get("path") == _absolute_url(str(self.export["path"]), self._export_options())

    def _record_of_this_run(self, described: dict[str, Any] | None, name: str) -> Any:
        """The JSON file ``name`` of the run directory, when the run directory describes this run (``described``)
        and this run exports without ``overwrite``; None otherwise, or when it is missing or cannot be read."""
        from imgcurate.rundir import RunDir

        if not (self.export and described) or self.export.get("overwrite"):
            return None
        run = RunDir(self.resolved_run_dir(), self._run_dir_options(), create=False)
        if not (run.describes(described) and run.exists(name)):
            return None
        try:
            return run.read_json(name)
        except ValueError:
            return None

    def _open_export(self) -> ImageTextPairDataset:
        return ImageTextPairDataset.from_webdataset(
            str(self.export["path"]), self.id_col, backend=self.backend, storage_options=self._export_options(),
            validate=False,
        )  # fmt: skip

    def _remove_report_temporaries(self) -> None:
        """Removes the temporaries that a run killed while writing a report left beside the report's file (only that
        file's: the folder may be shared)."""
        import fsspec

        from imgcurate.io._fs import remove_temporaries

        for kwargs in self.reports.values():
            if kwargs.get("path"):
                fs, path = fsspec.core.url_to_fs(str(kwargs["path"]), **(self.storage_options or {}))
                remove_temporaries(fs, posixpath.dirname(path), of=posixpath.basename(path))

    def _check_export_folder(self) -> None:
        """The export folder holds no shards, unless the export may overwrite them (a run's own state, not the
        config's: ``run --overwrite`` changes the answer)."""
        import fsspec

        from imgcurate.io.export import existing_shards

        if self.export:
            path = str(self.export["path"])
            fs, root = fsspec.core.url_to_fs(path, **self._export_options())
            existing_shards(fs, root, path, bool(self.export.get("overwrite")))

    def _export_options(self) -> dict[str, Any]:
        """fsspec's options for the export folder: the export's own ``storage_options``, else the input's."""
        given = (self.export or {}).get("storage_options")
        return dict(self.storage_options or {} if given is None else given)

    def _run_dir_options(self) -> dict[str, Any]:
        """fsspec's options for the run directory: the export's when the run directory is the default one beside
        the export; for one given, those of the export or else of the input whose filesystem (protocol) it is on,
        and none (the environment's credentials) when it is on neither's: an input's S3 keys are not handed to
        another object store."""
        if not self.run_dir and self.export:
            return self._export_options()
        if self.export and self.export.get("path") and _same_filesystem(self.run_dir, self.export["path"]):
            return self._export_options()
        if self.input is None or _same_filesystem(self.run_dir, self.input):  # no input: run(dataset)'s caller's
            return dict(self.storage_options or {})
        return {}

    def apply(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """The steps applied to ``dataset``, lazily (nothing is computed)."""
        for step in self.steps:
            dataset = step(dataset)
        return dataset

    def resolved_run_dir(self) -> str | None:
        """The run directory: ``run_dir``, else ``<export path>.run`` beside the output, else None (in memory)."""
        if self.run_dir:
            return self.run_dir
        if self.export and self.export.get("path"):
            return str(self.export["path"]).rstrip("/") + ".run"
        return None

    def describe(self, dataset: ImageTextPairDataset) -> dict[str, Any]:
        """What defines this run's results, as its run directory's ``run.json`` records it: the input (its
        fingerprint: :func:`~imgcurate.rundir.input_fingerprint`), the steps, the reports and the export (without
        ``overwrite``, which changes what the run may replace, not what it writes)."""
        from imgcurate.rundir import callable_description, fingerprint_chain, input_fingerprint

        fingerprint = fingerprint_chain([input_fingerprint(dataset.path, dataset.storage_options), dataset.id_col])
        return {
            "input": dataset.path,
            "input_url": _absolute_url(dataset.path, dataset.storage_options),
            "id_col": dataset.id_col,
            "fingerprint": fingerprint,
            "steps": [s.describe() if isinstance(s, Step) else callable_description(s) for s in self.steps],
            # what the run writes after the steps: a rerun that changes only these must not keep the old summary
            "reports": self.reports,
            # without overwrite (what the run may replace) and storage_options (how to reach the folder, which may
            # hold credentials), neither of which changes what is written
            "export": _without(self._export_settings(), "overwrite", "storage_options") if self.export else None,
        }

    def compute_steps(
        self, dataset: ImageTextPairDataset, described: dict[str, Any] | None = None
    ) -> tuple[ImageTextPairDataset, list[Any]]:
        """Runs the steps into the run directory (reusing the shards already done), or persists them in memory
        without one; returns the dataset that reads the results, and a record per step. ``described`` is
        :meth:`describe`'s answer when the caller has it already."""
        from imgcurate.rundir import RunDir, callable_description, fingerprint_chain

        folder = self.resolved_run_dir()
        if folder is None:
            return self.apply(dataset).persist(desc="computing the steps"), []
        run = RunDir(folder, self._run_dir_options())
        described = described or self.describe(dataset)
        fingerprint = described["fingerprint"]
        run.begin(described)
        records = []
        for position, step in enumerate(self.steps):
            if not isinstance(step, Step):  # a plain callable: applied lazily, recomputed where read
                dataset = step(dataset)
                fingerprint = fingerprint_chain([fingerprint, callable_description(step)["digest"]])
                continue
            fingerprint = fingerprint_chain([fingerprint, step.fingerprint()])
            columns, record = run.compute_step(dataset, step, position, fingerprint)
            dataset = dataset.with_columns(columns, step.output_columns())
            records.append(record)
        return dataset, records

    def run(
        self,
        dataset: ImageTextPairDataset | None = None,
        summary: Callable[[dict], None] | None = None,
    ) -> ImageTextPairDataset:
        """Opens the input (unless given), checks the column flow, then, on the pipeline's cluster: computes each
        step once per shard into the run directory (reusing shards done by an earlier, interrupted run), writes the
        reports, the run summary (``summary.json`` in the run directory; also passed to ``summary``), exports,
        and writes the run report (``report.html`` in the run directory, :mod:`imgcurate.reports.run`).

        Returns:
            The exported dataset (read back from the new shards). Without an export, the final dataset, reading
            the run directory (or, without one, held by the cluster, which is closed when this returns).
        """
        from imgcurate.rundir import RunDir, summarize

        if dataset is None:
            dataset = self.open_input()
        self.check_config(dataset)
        steps = [step for step in self.steps if isinstance(step, Step)]
        for step in steps:  # every step's files first: an offline run names what is missing before any download
            step.check_resources()
        import dask

        # on a cluster given by its address the tasks run elsewhere: a weight file fetched here would not be theirs
        with dask.config.set({"imgcurate.tasks-elsewhere": not self._tasks_here()}):
            for step in steps:
                step.prepare_all()  # before it is described: the fingerprint holds what was settled
        described = self.describe(dataset) if self.resolved_run_dir() else None
        published = self._published_export(described)
        begun = not published and self._export_begun(described)
        if not (published or begun):
            self._check_export_folder()
        self._remove_report_temporaries()
        with _cluster(self.cluster, self.steps, backend_of(dataset.metadata._meta).name):
            started = time.perf_counter()
            result, records = self.compute_steps(dataset, described)
            for name, kwargs in self.reports.items():
                _load(REPORTS, "report", name)(result, **kwargs)
            roles = [s.summary_columns() for s in self.steps if isinstance(s, Step)]
            if self.export:
                keep = self._export_settings().get("filter_column")
            else:  # no export: the summary counts what the last filter keeps
                keep = next((r["keep"] for r in reversed(roles) if "keep" in r), None)
            facts = summarize(result, records, keep, roles)
            out = result
            nothing = None
            if self.export and facts.get("samples_kept") == 0:
                # every sample dropped: no export (it would be an error), but the summary and the report say why
                nothing = (f"{self.export['path']}: no sample is selected for export (filter_column={keep!r}), so "
                           "nothing was written there (what it held is left as it was); the run summary and report "
                           "give the drops by reason")  # fmt: skip
                facts["exported"] = {"path": str(self.export["path"]), "shards": 0, "error": "no sample is selected"}
            elif published:  # this same run published it before it was stopped: the rerun finishes the rest
                run = RunDir(self.resolved_run_dir(), self._run_dir_options())
                if run.exists("exporting.json"):  # a stop between recording the export and removing this mark:
                    run.fs.rm(posixpath.join(run.root, "exporting.json"))  # left, it would let a later run replace
                out = self._open_export()  # another run's export in that folder without --overwrite
                facts["exported"] = {"path": out.path, "shards": out.num_shards, "seconds": 0.0, "reused": True}
            elif self.export:
                kwargs = self._export_settings()
                export_started = time.perf_counter()
                path = str(kwargs.pop("path"))
                run = RunDir(self.resolved_run_dir(), self._run_dir_options()) if described else None

                def began() -> None:  # the folder was found fit to write: a stop from here until exported.json is
                    # written is the same run's, and its rerun may write the folder again; an earlier export's
                    # record goes first, so that both files are there only after a stop as this one is recorded
                    if run.exists("exported.json"):
                        run.fs.rm(posixpath.join(run.root, "exported.json"))
                    run.write_json("exporting.json", {"path": _absolute_url(path, self._export_options())})

                result._export(path, **{**kwargs, "overwrite": bool(kwargs.get("overwrite")) or begun},
                               on_start=began if run is not None else None)  # fmt: skip
                if run is not None:  # recorded once published, before opening it (long at 10^5 shards)
                    from imgcurate.io.export import manifest_digest

                    run.write_json(
                        "exported.json", {"path": path, "manifest": manifest_digest(path, self._export_options())}
                    )
                    run.fs.rm(posixpath.join(run.root, "exporting.json"))
                out = self._open_export()
                facts["exported"] = {"path": out.path, "shards": out.num_shards,
                                     "seconds": round(time.perf_counter() - export_started, 3)}  # fmt: skip
            facts["seconds"] = round(time.perf_counter() - started, 3)
            if self.resolved_run_dir():
                run = RunDir(self.resolved_run_dir(), self._run_dir_options())
                run.write_json("summary.json", facts)
                if self.report:
                    from imgcurate.reports.run import REPORT_NAME, run_report

                    run_report(result, run.url(REPORT_NAME), facts, storage_options=self._run_dir_options())
            if summary is not None:
                summary(facts)
            if nothing is not None:
                raise ValueError(nothing)
            return out


def _same_filesystem(a: Any, b: Any) -> bool:
    """Whether two URLs are on the same kind of filesystem (``s3://`` and ``s3a://`` are; a local path and
    ``memory://`` are not), judged by the last link of a chained URL (``simplecache::s3://...``)."""
    import fsspec

    def kind(url: Any) -> Any:
        protocol = fsspec.core.split_protocol(str(url).split("::")[-1])[0] or "file"
        try:
            return fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError):  # not installed here: its name stands for it
            return protocol

    return kind(a) == kind(b)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader with a key given twice in one mapping an error: the plain loader keeps the last value, so a
    second ``steps:`` would silently drop the first list."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: its keys may be given again, to override
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            twice = key in seen
        except TypeError:  # an unhashable key: yaml's own error follows
            continue
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.2's floats too: PyYAML follows YAML 1.1, where a float needs a dot, so `eps: 1e-4` or `1.0e3` was text
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_config(path: str) -> dict:
    """A pipeline config file as a mapping (an empty file is an empty one).

    Raises:
        ConfigError: naming the file: it is not YAML, gives a key twice, or is not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader that also refuses twice-given keys
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a pipeline config file") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a pipeline config is a mapping of sections, got {type(config).__name__}")
    return config


def _worker_processes(spec: dict | None) -> bool:
    """Whether a ``cluster`` section runs its tasks in processes other than this one."""
    if not spec:
        return False
    if "address" in spec or spec.get("type") == "cuda":
        return True
    return bool(spec.get("processes", True))


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


def _absolute_url(path: str, storage_options: dict | None) -> str:
    """``path`` as a full URL (a local folder made absolute), so the run directory names its input from anywhere."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.unstrip_protocol(root)


def zip_columns_meta(meta: Any, added: Any) -> Any:
    """``meta`` with the columns of ``added`` beside it (what :func:`imgcurate._dask.zip_columns` gives, on meta)."""
    out = meta.copy(deep=False)
    for name in added.columns:
        out[name] = added[name]
    return out


def run_config(path: str) -> ImageTextPairDataset:
    """Runs the pipeline described by a YAML file."""
    return Pipeline.from_yaml(path).run()
