"""Resource estimates for a pipeline before running it: samples, bytes read and written, memory, and time.

Counts come from the input's parquet footers and tar sizes (no image is read). Each step's estimate comes from one
table (:data:`ESTIMATORS`), keyed by step class. Times need ``measure=True``: it times the embedder's forward pass
on random tensors on the configured device, and this machine's float32 matrix-product speed, which is what semantic
dedup spends its time on (KMeans, assignment and in-cluster similarities are matrix products).

Example:
    >>> from imgcurate.estimate import estimate_config
    >>> report = estimate_config("examples/sample_pipeline.yaml", measure=False)  # doctest: +SKIP
    >>> print(report.to_text())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import posixpath
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Estimate", "Report", "estimate_config", "estimate_input", "ESTIMATORS", "THROUGHPUT"]

#: Samples per KMeans training point budget (faiss trains on 256 sampled points per cluster).
_KMEANS_SAMPLE_PER_CLUSTER = 256


@dataclasses.dataclass
class Estimate:
    """One step's estimate. Bytes are totals over the whole input; None means not known without measuring."""

    step: str
    adds: str = ""
    read_bytes: int = 0
    written_bytes: int = 0
    memory_bytes: int = 0
    seconds: float | None = None
    notes: str = ""
    gpu_memory_bytes: int = 0


@dataclasses.dataclass
class Report:
    """The estimate of a whole pipeline."""

    input: str
    shards: int
    samples: int
    tar_bytes: int
    steps: list[Estimate]

    def to_text(self) -> str:
        if not self.steps:
            return (
                f"input: {self.input}: {self.shards} shards, {self.samples:,} samples, {_size(self.tar_bytes)} of tars"
            )
        width = max([34, *(len(e.adds) for e in self.steps)])  # every column a step adds, in full
        lines = [
            f"input: {self.input}: {self.shards} shards, {self.samples:,} samples, {_size(self.tar_bytes)} of tars",
            f"{'step':<24} {'adds':<{width}} {'reads':>9} {'writes':>9} {'memory':>9} {'GPU mem':>9} {'time':>10}",
        ]
        for e in self.steps:
            when = "-" if e.seconds is None else _duration(e.seconds)
            lines.append(
                f"{e.step:<24} {e.adds:<{width}} {_size(e.read_bytes):>9} {_size(e.written_bytes):>9} "
                f"{_size(e.memory_bytes):>9} {_size(e.gpu_memory_bytes) if e.gpu_memory_bytes else '-':>9} {when:>10}"
            )
            if e.notes:
                lines.append(f"{'':<24} {e.notes}")
        known = [e.seconds for e in self.steps if e.seconds is not None]
        if known:
            lines.append(f"total time (steps with a figure): {_duration(sum(known))}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _count_input(path: str, storage_options: dict | None) -> tuple[int, int, int]:
    """(shards, samples, tar bytes) from the parquet footers (or tar headers where a parquet is missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcurate.errors import ShardError
    from imgcurate.io._fs import folder_fs, shard_tars, task_url
    from imgcurate.io.export import check_listed_shards
    from imgcurate.io.schema import parquet_path_for
    from imgcurate.io.tar import read_keys

    fs, root = folder_fs(path, storage_options)
    tars = shard_tars(fs, root, path)
    check_listed_shards(fs, root, tars)
    samples = tar_bytes = 0
    for tar in tars:
        tar_bytes += fs.size(tar)
        parquet = parquet_path_for(tar)
        if fs.exists(parquet):
            try:
                with fs.open(parquet, "rb") as f:
                    samples += pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowException) as err:
                raise ShardError(task_url(fs, parquet), f"cannot read parquet ({err})") from None
        else:
            url = tar if "://" in path else posixpath.join(path, posixpath.basename(tar))
            samples += len(read_keys(url, storage_options=storage_options))
    return len(tars), samples, tar_bytes


@dataclasses.dataclass
class _State:
    """What the steps so far have told later ones."""

    samples: int
    tar_bytes: int
    measure: bool
    embedding_dim: int | None = None
    gflops: float | None = None

    def matmul_gflops(self) -> float:
        """This machine's float32 matrix-product speed (measured once)."""
        if self.gflops is None:
            import numpy as np

            a = np.random.default_rng(0).standard_normal((2048, 512), dtype=np.float32)
            a @ a.T
            start = time.perf_counter()
            for _ in range(5):
                a @ a.T
            self.gflops = 5 * 2 * 2048 * 2048 * 512 / (time.perf_counter() - start) / 1e9
        return self.gflops


#: Measured end-to-end embedding throughput, img/s per worker: device -> timm model (no pretrained tag) ->
#: (img/s, GFLOP per image, where the figure comes from). CPU figures: the images per CPU second of the process
#: times the 2 cores of the machine they were measured on (wall-clock rates on a shared box say more about its load).
#: A model not listed is scaled from the listed one closest in GFLOP per image (rate x its GFLOP / the model's
#: GFLOP). No GPU figure exists yet: benchmarks/RESULTS.md has none (no GPU was lent to this project); add
#: ``"cuda"`` rows from ``benchmarks/embed.py --device cuda``.
_EMBED_CPU = "benchmarks/RESULTS.md, embed.py CPU 2026-11-24, 'ours' images per CPU second x 2 cores"
THROUGHPUT: dict[str, dict[str, tuple[float, float, str]]] = {
    "cpu": {
        "resnet50": (47.0, 8.17, f"{_EMBED_CPU} (23.5 x 2; wall 29.4 on a loaded box)"),
        "vit_base_patch32_clip_224": (39.4, 8.72, f"{_EMBED_CPU} (19.7 x 2; wall 11.7 on a loaded box)"),
        "efficientnet_lite0": (205.4, 0.77, f"{_EMBED_CPU} (102.7 x 2; wall 82.0 on a loaded box)"),
    },
    "cuda": {},
}


def model_size(model_name: str, input_size: tuple[int, ...], model_kwargs: dict | None = None) -> tuple[int, float]:
    """(parameters, GFLOP per image) of a timm model, from its architecture on torch's meta device (no weights)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {})).eval()
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, *input_size))
    return int(params), counter.get_total_flops() / 1e9


def table_rate(model_name: str, device: str, gflop: float) -> tuple[float, str] | None:
    """(img/s, source) from :data:`THROUGHPUT`: the model's own figure, else one scaled by GFLOP per image from the
    closest listed model; None when the device has no figure."""
    import math

    rows = THROUGHPUT.get(device.split(":")[0], {})
    base = model_name.split(".")[0]
    if base in rows:
        rate, _, source = rows[base]
        return rate, source
    if not rows or gflop <= 0:
        return None
    ref = min(rows, key=lambda name: abs(math.log(rows[name][1] / gflop)))
    rate, ref_gflop, source = rows[ref]
    return rate * ref_gflop / gflop, f"scaled by GFLOP/img ({gflop:.1f} vs {ref_gflop}) from {ref}: {source}"


def _embedder(step: Any, st: _State) -> Estimate:
    import torch

    from imgcurate._models import resolve_device

    device = resolve_device(step.device) if st.measure or step.device == "auto" else step.device
    size = tuple(step.data_config["input_size"])
    dim = step.embedding_dim()
    st.embedding_dim = dim
    params, gflop = model_size(step.model_name, size, step.model_kwargs)
    batch = step.batch_size_for(device)
    inputs = batch * 3 * size[1] * size[2] * 4  # one float32 batch
    heads = [c.pred_column for c in step.classifiers]
    out = Estimate(
        type(step).__name__,
        adds=f"{step.image_embedding_column} ({dim}-d)" + (f" + {', '.join(heads)}" if heads else ""),
        read_bytes=st.tar_bytes,
        written_bytes=st.samples * (dim * 4 + 4 * len(heads)),
    )
    weights = params * 4  # float32 weights
    if device.startswith("cuda"):
        out.memory_bytes = 4 * inputs  # decoded batches in flight on the host
        out.gpu_memory_bytes = weights + 2 * inputs  # activations not counted
    else:
        out.memory_bytes = weights + 4 * inputs  # a few batches of input tensors in flight
    size_note = f"{params / 1e6:,.0f}M parameters, {gflop:.1f} GFLOP/img, batch {batch} on {device}"
    if st.measure:
        probe = copy.copy(step)
        probe.pretrained, probe.checkpoint_path = False, None  # only the speed matters: random weights, no download
        model = probe.load_model(device)
        x = torch.randn(batch, *size, device=device)
        step._forward(model, x, device)
        start, reps = time.perf_counter(), 3
        for _ in range(reps):
            step._forward(model, x, device)
        rate = reps * batch / (time.perf_counter() - start)
        # benchmarks/embed.py: the whole pipeline runs at >= 0.9 x the forward pass alone
        out.seconds = st.samples / (0.9 * rate)
        out.notes = f"forward pass {rate:,.0f} img/s on {device} per worker; time is for one worker; {size_note}"
        return out
    found = table_rate(step.model_name, device, gflop)
    if found is None:
        where = "on a machine with one" if device.startswith("cuda") else "here"
        out.notes = f"{size_note}; no measured throughput on {device} (--measure times it {where})"
    else:
        rate, source = found
        out.seconds = st.samples / rate
        out.notes = f"{size_note}; {rate:,.1f} img/s per worker ({source}); time is for one worker"
    return out


def _classifier(step: Any, st: _State) -> Estimate:
    return Estimate(type(step).__name__, adds=step.pred_column, written_bytes=st.samples * 4)


def _exact(step: Any, st: _State) -> Estimate:
    return Estimate(
        type(step).__name__,
        adds=", ".join(step.output_columns()),
        read_bytes=st.tar_bytes,
        written_bytes=st.samples * 80,
        notes="reads every image" + (" and decodes it" if getattr(step, "by", "bytes") == "pixels" else ""),
    )


#: Semantic dedup measured: (samples, dims, clusters, KMeans iterations run, seconds, where it comes from).
DEDUP_REFERENCE = (1_000_000, 512, 1000, 10, 28.1, "benchmarks/RESULTS.md, dedup.py CPU 2026-11-22, 2 cores")


def _dedup_flops(n: int, dim: int, k: int, iterations: int) -> float:
    """KMeans on its training sample, assignment of every point, in-cluster similarities (equal clusters)."""
    sample = min(n, _KMEANS_SAMPLE_PER_CLUSTER * k)
    return 2 * dim * (iterations * sample * k + n * k + n * max(n // max(k, 1), 1))


def _semantic(step: Any, st: _State) -> Estimate:
    n, k = st.samples, step.n_clusters
    dim = st.embedding_dim
    out = Estimate(type(step).__name__, adds=", ".join(step.output_columns()))
    out.written_bytes = n * 40
    if dim is None:
        out.notes = "embedding size unknown (no embedder earlier in this pipeline)"
        return out
    # the persisted frame's embeddings (on the workers under a cluster) plus the array gathered in this process
    out.memory_bytes = 2 * n * dim * 4
    flops = _dedup_flops(n, dim, k, step.max_iter)
    if not st.measure:
        n0, dim0, k0, iters0, seconds0, source = DEDUP_REFERENCE
        rate = _dedup_flops(n0, dim0, k0, iters0) / seconds0
        out.seconds = flops / rate
        out.notes = (
            f"at most (max_iter={step.max_iter}); scaled by matrix-product work from {n0:,} x {dim0}-d in "
            f"{seconds0} s ({source})"
        )
        return out
    if st.measure:
        out.seconds = flops / (st.matmul_gflops() * 1e9)
        out.notes = (
            f"at most; KMeans usually stops well before max_iter={step.max_iter} "
            f"(matrix products at {st.matmul_gflops():.0f} GFLOP/s here; clusters assumed of equal size)"
        )
    return out


def _clip(step: Any, st: _State) -> Estimate:
    """Both towers: the image side is the embedder's (timed on random tensors); the text side adds an embedding."""
    import torch

    from imgcurate._models import resolve_device

    dim = step.embedding_dim()
    st.embedding_dim = dim
    size = step._preprocess_cfg["size"]
    side = size if isinstance(size, int) else size[0]
    heads = [c.pred_column for c in step.classifiers]
    out = Estimate(
        type(step).__name__,
        adds=f"{step.image_embedding_column}, {step.text_embedding_column} ({dim}-d), {step.score_column}",
        read_bytes=st.tar_bytes,
        written_bytes=st.samples * (2 * dim * 4 + 4 + 4 * len(heads)),
        memory_bytes=4 * step.batch_size * 3 * side * side * 4,
    )
    if st.measure and step.pretrained is None and step.checkpoint_path is None:
        device = resolve_device(step.device)
        towers = step.model(device)
        x = torch.randn(step.batch_size, 3, side, side)
        tokens = towers.tokenizer(["a photo of a cat on a sofa"] * step.batch_size)
        step._forward(towers, x, device)
        start = time.perf_counter()
        step._forward(towers, x, device)
        step._forward(towers.text, tokens, device)
        rate = step.batch_size / (time.perf_counter() - start)
        out.seconds = st.samples / (0.9 * rate)
        out.notes = f"forward passes {rate:,.0f} pairs/s on {device} per worker; time is for one worker"
    elif st.measure:
        out.notes = "not timed: measuring would load the pretrained weights"
    return out


def _captions(step: Any, st: _State) -> Estimate:
    return Estimate(type(step).__name__, adds=", ".join(step.output_columns()), written_bytes=st.samples * 16)


def _filter(step: Any, st: _State) -> Estimate:
    return Estimate(type(step).__name__, adds=", ".join(step.output_columns()), written_bytes=st.samples * 16)


#: step class name -> its estimator.
ESTIMATORS: dict[str, Callable[[Any, _State], Estimate]] = {
    "TimmImageEmbedder": _embedder,
    "AestheticClassifier": _classifier,
    "NsfwClassifier": _classifier,
    "ExactDuplicates": _exact,
    "SemanticDeduplicator": _semantic,
    "SampleFilter": _filter,
    "ClipEmbedder": _clip,
    "CaptionFeatures": _captions,
    "ClipTextFilter": _filter,
}


def estimate_input(path: str, storage_options: dict | None = None) -> Report:
    """Shards, samples and tar bytes of the input folder ``path`` (from the parquet footers)."""
    shards, samples, tar_bytes = _count_input(path, storage_options)
    return Report(path, shards, samples, tar_bytes, [])


def estimate_config(path: str, measure: bool = False, input_path: str | None = None) -> Report:
    """Estimates the resources of the pipeline in the YAML file ``path``.

    Args:
        path: a pipeline config (see :mod:`imgcurate.pipeline`).
        measure: also time the embedder's forward pass and the matrix-product speed on this machine (seconds).
            Without it the embedder's time comes from :data:`THROUGHPUT` where it has a figure for the device.
        input_path: the input folder, instead of the config's ``input``.

    Raises:
        FileNotFoundError: the input folder holds no shards.
        ValueError: the config is invalid: every check that ``imgcurate run`` makes before any work and that needs
            neither an image nor a cluster (:meth:`~imgcurate.pipeline.Pipeline.check_config`), with run's message.
    """
    from imgcurate.pipeline import Pipeline

    pipeline = Pipeline.from_yaml(path)
    if input_path:
        pipeline.input = input_path
    if not pipeline.input:
        raise ValueError(f"{path}: the config has no 'input' folder (or pass --input-path)")
    # a GPU the config names need not be usable here: a config for the GPU nodes is estimated on any machine
    pipeline.check_config(pipeline.open_input(validate=False), devices=False)
    from imgcurate.errors import ConfigError
    from imgcurate.steps.base import Step

    # --measure runs the models here (whatever cluster the config names), on the devices they name
    problems = [f"steps[{i}].{problem}" for i, step in enumerate(pipeline.steps) if measure and isinstance(step, Step)
                for problem in step.device_problems()]  # fmt: skip
    if problems:
        raise ConfigError(f"{problems[0]} (--measure times the steps on this machine: estimate without it, or on "
                          "a machine with that device)")  # fmt: skip
    shards, samples, tar_bytes = _count_input(pipeline.input, pipeline.storage_options)
    st = _State(samples, tar_bytes, measure)
    steps = []
    for step in pipeline.steps:
        estimator = ESTIMATORS.get(type(step).__name__)
        steps.append(estimator(step, st) if estimator else Estimate(type(step).__name__, notes="no estimate"))
    if pipeline.export:
        steps.append(
            Estimate(
                "export",
                adds=str(pipeline.export["path"]),
                read_bytes=tar_bytes,
                written_bytes=tar_bytes,
                notes="writes at most the input's size (less as the filter drops samples)",
            )
        )
    return Report(pipeline.input, shards, samples, tar_bytes, steps)
