"""``imgcurate doctor``: what of the GPU stack is installed here, and whether each piece runs an operation.

One line per component: torch CUDA, cuDF, dask_cudf, cuML, raft-dask (cuML's Dask estimators), CuPy, DALI and
dask-cuda, each with its installed version and whether a one-line operation ran (or why not). Given a pipeline
config it also lists what the config asks for (``backend: cudf``, ``cluster: {type: cuda}``, a ``kmeans_backend``,
``decoder: dali``, ``device: cuda``) and fails when one of those would not work.

The torch and cuDF answers are those of :mod:`imgcurate.device` (the one device rule), so the doctor and a run never
disagree. Nothing is imported where no NVIDIA driver is visible: the component is reported as installed, not run.

Example:
    >>> from imgcurate.doctor import diagnose, render
    >>> report = diagnose()  # doctest: +SKIP
    >>> print(render(report))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

from imgcurate import device

__all__ = ["Check", "Report", "COMPONENTS", "check_config", "diagnose", "requirements", "render", "main"]


@dataclasses.dataclass(frozen=True)
class Check:
    """One component: its pip package, installed version (None: not installed) and whether an operation ran."""

    name: str
    package: str | None
    version: str | None
    ran: bool
    detail: str

    @property
    def installed(self) -> bool:
        return self.version is not None


@dataclasses.dataclass
class Report:
    """The checks, what a config asks for (component -> the config keys that ask) and the failed requirements."""

    checks: dict[str, Check]
    needs: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [name for name in self.needs if not self.checks[name].ran]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


# ---------------------------------------------------------------------------------------------------- probes
def _probe_dask_cudf() -> None:
    import cudf
    import dask_cudf

    frame = dask_cudf.from_cudf(cudf.DataFrame({"a": [1, 2]}), npartitions=1)
    assert int(frame["a"].sum().compute()) == 3


def _probe_cuml() -> None:
    import numpy as np
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=1, max_iter=2, output_type="numpy").fit(np.ones((4, 2), dtype=np.float32))
    assert np.allclose(km.cluster_centers_, 1.0)


def _probe_raft_dask() -> None:
    # cuml.dask needs raft_dask and dask_cudf; its estimators run only on a cluster's workers, so importing is the test
    import cuml.dask.cluster  # noqa: F401
    import raft_dask  # noqa: F401


def _probe_cupy() -> None:
    import cupy

    assert int(cupy.ones(2, dtype=cupy.int32).sum()) == 2


def dali_probe(dali_device: str = "gpu") -> None:
    """Decodes an 8x8 JPEG with DALI (``mixed`` for ``gpu``): its version floor, pipeline build and run.

    Raises:
        MissingDependencyError: DALI older than :data:`imgcurate.embedders.dali.DALI_MIN_VERSION`.
    """
    import io

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    from imgcurate.embedders.dali import check_dali_version

    check_dali_version()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    jpeg = np.frombuffer(buffer.getvalue(), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if dali_device == "gpu" else None)
    def pipe():
        data = fn.external_source(source=lambda: [jpeg], batch=True)
        decode_on = "mixed" if dali_device == "gpu" else "cpu"
        return fn.decoders.image(data, device=decode_on, output_type=types.RGB, adjust_orientation=True)

    pipeline = pipe()
    pipeline.build()
    (images,) = pipeline.run()
    if dali_device == "gpu":
        images = images.as_cpu()
    assert np.asarray(images.at(0)).shape == (8, 8, 3)


def _probe_dask_cuda() -> None:
    from dask_cuda.utils import get_n_gpus

    assert get_n_gpus() >= 1


def _probe_torch() -> None:
    problem = device.torch_cuda_problem()
    if problem:
        raise RuntimeError(problem)


def _probe_cudf() -> None:
    problem = device.cudf_problem()
    if problem:
        raise RuntimeError(problem)


@dataclasses.dataclass(frozen=True)
class Component:
    """A piece of the GPU stack: the module to find, the pip packages that may provide it (first found wins) and a
    one-line operation that raises when it cannot run."""

    module: str
    packages: tuple[str, ...]
    probe: Callable[[], None]
    operation: str


#: component name -> how to find and try it (the order is the order of the printout)
COMPONENTS: dict[str, Component] = {
    "torch CUDA": Component("torch", ("torch",), _probe_torch, "a CUDA tensor sum"),
    "cuDF": Component("cudf", ("cudf-cu13", "cudf-cu12", "cudf"), _probe_cudf, "a cuDF Series sum"),
    "dask_cudf": Component(
        "dask_cudf", ("dask-cudf-cu13", "dask-cudf-cu12", "dask-cudf"), _probe_dask_cudf, "a dask_cudf sum"
    ),
    "cuML": Component("cuml", ("cuml-cu13", "cuml-cu12", "cuml"), _probe_cuml, "a cuML KMeans fit"),
    "raft-dask": Component(
        "raft_dask", ("raft-dask-cu13", "raft-dask-cu12", "raft-dask"), _probe_raft_dask, "import cuml.dask"
    ),
    "CuPy": Component("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy"), _probe_cupy, "a CuPy sum"),
    "DALI": Component(
        "nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"), dali_probe, "a mixed JPEG decode"
    ),
    "dask-cuda": Component("dask_cuda", ("dask-cuda",), _probe_dask_cuda, "count the GPUs"),
}


def _installed(component: Component) -> tuple[str | None, str | None]:
    """(package, version) of the first installed package that provides the component, or (None, None)."""
    try:
        if importlib.util.find_spec(component.module) is None:
            return None, None
    except (ImportError, ValueError):  # a parent package missing ("nvidia" for nvidia.dali)
        return None, None
    for package in component.packages:
        try:
            return package, metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return component.module, "unknown"


def check(name: str) -> Check:
    """Finds and tries one component of :data:`COMPONENTS`."""
    component = COMPONENTS[name]
    package, version = _installed(component)
    if version is None:
        return Check(name, component.packages[0], None, False, "not installed (pip install 'imgcurate[gpu]')")
    if not device.driver_visible():
        return Check(name, package, version, False, "not run: no NVIDIA driver is visible")
    try:
        component.probe()
    except Exception as err:  # noqa: BLE001 - any failure is the answer, with its reason
        text = str(err).strip().splitlines()
        reason = text[0] if text else type(err).__name__
        return Check(name, package, version, False, f"{component.operation} failed: {reason}")
    return Check(name, package, version, True, f"{component.operation} ran")


# ---------------------------------------------------------------------------------------------------- a config
def _step_options(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, options) of every step in a parsed pipeline config, classifiers inside embedders included."""
    for i, spec in enumerate(config.get("steps") or []):
        if not isinstance(spec, dict) or len(spec) != 1:
            continue
        ((name, options),) = spec.items()
        if not isinstance(options, dict):
            continue
        yield f"steps[{i}].{name}", options
        for j, clf in enumerate(options.get("classifiers") or []):
            if isinstance(clf, dict) and len(clf) == 1 and isinstance(next(iter(clf.values())), dict):
                yield f"steps[{i}].{name}.classifiers[{j}]", next(iter(clf.values()))


#: kmeans_backend -> the components it needs
_KMEANS_NEEDS = {"cuml": ("cuML",), "cuml-dask": ("cuML", "raft-dask", "dask_cudf", "dask-cuda")}


def requirements(config: dict[str, Any]) -> dict[str, list[str]]:
    """The components a parsed pipeline config needs: component name -> the config keys that ask for it.

    Read from the YAML as written (not by building the steps, which would stop at the first missing package).
    """
    needs: dict[str, list[str]] = {}

    def need(names: tuple[str, ...], why: str) -> None:
        for name in names:
            needs.setdefault(name, []).append(why)

    if config.get("backend") == "cudf":
        need(("cuDF", "dask_cudf"), "backend: cudf")
    cluster = config.get("cluster")
    if isinstance(cluster, dict) and cluster.get("type") == "cuda":
        need(("dask-cuda", "torch CUDA"), "cluster.type: cuda")
    for where, options in _step_options(config):
        kmeans = options.get("kmeans_backend")
        if kmeans in _KMEANS_NEEDS:
            need(_KMEANS_NEEDS[kmeans], f"{where}.kmeans_backend: {kmeans}")
        if options.get("decoder") == "dali":
            need(("DALI",), f"{where}.decoder: dali")
        if options.get("decoder") == "torchvision" and str(options.get("device", "auto")).startswith("cuda"):
            need(("torch CUDA",), f"{where}.decoder: torchvision on cuda")
        dev = str(options.get("device", "auto"))
        if dev.startswith("cuda"):
            need(("torch CUDA",), f"{where}.device: {dev}")
            if where.endswith("SemanticDeduplicator"):  # its similarity tiles run on CuPy
                need(("CuPy",), f"{where}.device: {dev}")
    return needs


def diagnose(config: dict[str, Any] | None = None) -> Report:
    """Checks every component, and (given a parsed pipeline config) what the config needs."""
    report = Report({name: check(name) for name in COMPONENTS})
    if config:
        report.needs = requirements(config)
    return report


def render(report: Report) -> str:
    """The report as aligned text lines, ending with what a config needs and what of that would not work."""
    driver = device.driver_version() if device.driver_visible() else None
    lines = [f"NVIDIA driver: {driver or ('visible' if device.driver_visible() else 'none visible')}"]
    width = max(map(len, report.checks))
    pwidth = max(len(c.package or "") for c in report.checks.values())
    for name, c in report.checks.items():
        state = "ok  " if c.ran else ("--  " if not c.installed or not device.driver_visible() else "FAIL")
        lines.append(f"{state} {name:<{width}}  {c.package or '':<{pwidth}}  {c.version or '-':<10}  {c.detail}")
    if report.needs:
        lines.append("the config needs:")
        for name, why in report.needs.items():
            lines.append(
                f"  {name:<{width}}  {'ok' if report.checks[name].ran else 'WOULD NOT WORK'}  ({'; '.join(why)})"
            )
    if report.failures:
        lines.append(f"not usable here: {', '.join(report.failures)} (pip install 'imgcurate[gpu]' on a machine with a "
                     "driver for CUDA 13)")  # fmt: skip
    return "\n".join(lines)


def check_config(path: str) -> tuple[list[str], list[str]]:
    """The checks ``imgcurate run`` makes of the config at ``path`` before any work, without an image
    (:meth:`~imgcurate.pipeline.Pipeline.check_config`), whether what its steps load is here
    (:meth:`~imgcurate.steps.Step.check_resources`), and with ``cluster: {address: ...}`` the checks of the running
    scheduler's workers (:func:`~imgcurate.pipeline.check_workers`).

    Returns:
        (what would not work: a missing package or missing weights here, a problem of the cluster's workers or no
        scheduler at its address; notes: a check that could not be made).

    Raises:
        ConfigError: the config is wrong, with the message ``run`` gives.
    """
    from imgcurate.errors import MissingDependencyError, from_an_object_store, one_line
    from imgcurate.pipeline import Pipeline
    from imgcurate.steps.base import Step

    try:
        pipeline = Pipeline.from_yaml(path)
    except MissingDependencyError as err:  # the components above say which; the steps after it are not checked
        return [str(err)], []
    notes = []
    try:
        dataset = pipeline.open_input(validate=False)
    except Exception as err:  # noqa: BLE001 - the input is not reachable from this machine (a missing folder, an
        # object store without credentials here): the column flow is not checked, the rest is
        if not (isinstance(err, OSError) or from_an_object_store(err)):
            raise
        dataset = None
        notes.append(f"column flow not checked: the input cannot be read here ({type(err).__name__}: {one_line(err)})")
    pipeline.check_config(dataset, devices=False)
    problems = pipeline.device_problems()
    for step in pipeline.steps:
        if isinstance(step, Step):
            problems += step.resource_problems()
    if pipeline.cluster and "address" in pipeline.cluster:
        problems.extend(_cluster_problems(pipeline, dataset))
    return problems, notes


def _cluster_problems(pipeline: Any, dataset: Any) -> list[str]:
    """The checks ``imgcurate run`` makes on a running scheduler's workers before any work
    (:func:`~imgcurate.pipeline.check_workers`): what would not work there, or that no scheduler answered."""
    from imgcurate.backends import backend_of
    from imgcurate.errors import ClusterError
    from imgcurate.pipeline import check_workers, connect

    if dataset is not None:
        backend = backend_of(dataset.metadata._meta).name
    else:  # the input is not readable here: the backend the config names (auto takes the CPU's)
        backend = "cudf" if pipeline.backend == "cudf" else "pandas"
    try:
        with connect(pipeline.cluster["address"]) as client:
            check_workers(client, list(pipeline.steps), backend)
    except ClusterError as err:
        return [str(err)]
    return []


def main(config_path: str | None = None) -> int:
    """Prints the report; returns 1 when the config at ``config_path`` asks for something that would not work.

    Raises:
        ConfigError: the config is one that ``imgcurate run`` refuses (see :func:`check_config`).
    """
    config = None
    problems: list[str] = []
    notes: list[str] = []
    if config_path:
        from imgcurate.pipeline import read_config

        config = read_config(config_path)
        problems, notes = check_config(config_path)
    report = diagnose(config)
    print(render(report))
    for line in notes:
        print(line)
    for line in problems:
        print(f"would not work: {line}")
    return 1 if problems else report.exit_code
