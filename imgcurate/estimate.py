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

__all__ = ["Estimate", "Report", "estimate_config", "ESTIMATORS"]

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


@dataclasses.dataclass
class Report:
    """The estimate of a whole pipeline."""

    input: str
    shards: int
    samples: int
    tar_bytes: int
    steps: list[Estimate]

    def to_text(self) -> str:
        lines = [
            f"input: {self.input}: {self.shards} shards, {self.samples:,} samples, {_size(self.tar_bytes)} of tars",
            f"{'step':<24} {'adds':<34} {'reads':>9} {'writes':>9} {'memory':>9} {'time':>10}",
        ]
        for e in self.steps:
            when = "-" if e.seconds is None else _duration(e.seconds)
            lines.append(
                f"{e.step:<24} {e.adds[:34]:<34} {_size(e.read_bytes):>9} {_size(e.written_bytes):>9} "
                f"{_size(e.memory_bytes):>9} {when:>10}"
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
    import fsspec
    import pyarrow.parquet as pq

    from imgcurate.io.tar import read_keys

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tars = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    if not tars:
        raise FileNotFoundError(f"{path}: no .tar shards found")
    samples = tar_bytes = 0
    for tar in tars:
        tar_bytes += fs.size(tar)
        parquet = tar[: -len(".tar")] + ".parquet"
        if fs.exists(parquet):
            with fs.open(parquet, "rb") as f:
                samples += pq.ParquetFile(f).metadata.num_rows
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


def _embedder(step: Any, st: _State) -> Estimate:
    import torch

    from imgcurate._models import resolve_device

    probe = copy.copy(step)
    probe.pretrained, probe.checkpoint_path = False, None  # only the shapes matter: random weights, no download
    device = resolve_device(step.device) if st.measure else "cpu"
    model = probe.load_model(device)
    size = probe.data_config["input_size"]
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, *size, device=device)).shape[-1])
    st.embedding_dim = dim
    heads = [c.pred_column for c in step.classifiers]
    out = Estimate(
        type(step).__name__,
        adds=f"{step.image_embedding_column} ({dim}-d)" + (f" + {', '.join(heads)}" if heads else ""),
        read_bytes=st.tar_bytes,
        written_bytes=st.samples * (dim * 4 + 4 * len(heads)),
        memory_bytes=4 * step.batch_size * 3 * size[1] * size[2] * 4,  # a few batches of input tensors in flight
    )
    if st.measure:
        x = torch.randn(step.batch_size, *size, device=device)
        step._forward(model, x, device)
        start, reps = time.perf_counter(), 3
        for _ in range(reps):
            step._forward(model, x, device)
        rate = reps * step.batch_size / (time.perf_counter() - start)
        # benchmarks/embed.py: the whole pipeline runs at >= 0.9 x the forward pass alone
        out.seconds = st.samples / (0.9 * rate)
        out.notes = f"forward pass {rate:,.0f} img/s on {device} per worker; time is for one worker"
    return out


def _classifier(step: Any, st: _State) -> Estimate:
    return Estimate(type(step).__name__, adds=step.pred_column, written_bytes=st.samples * 4)


def _exact(step: Any, st: _State) -> Estimate:
    return Estimate(
        type(step).__name__,
        adds="image_sha256, exact_duplicate(_of)",
        read_bytes=st.tar_bytes,
        written_bytes=st.samples * 80,
        notes="reads every image" + (" and decodes it" if getattr(step, "by", "bytes") == "pixels" else ""),
    )


def _semantic(step: Any, st: _State) -> Estimate:
    n, k = st.samples, step.n_clusters
    dim = st.embedding_dim
    out = Estimate(type(step).__name__, adds="cluster, max_similarity, duplicate_of, is_duplicate")
    out.written_bytes = n * 40
    if dim is None:
        out.notes = "embedding size unknown (no embedder earlier in this pipeline)"
        return out
    # the persisted frame's embeddings (on the workers under a cluster) plus the array gathered in this process
    out.memory_bytes = 2 * n * dim * 4
    sample = min(n, _KMEANS_SAMPLE_PER_CLUSTER * k)
    flops = 2 * dim * (step.max_iter * sample * k + n * k + n * max(n // max(k, 1), 1))
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
    return Estimate(type(step).__name__, adds="keep, drop_reason", written_bytes=st.samples * 16)


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


def estimate_config(path: str, measure: bool = False) -> Report:
    """Estimates the resources of the pipeline in the YAML file ``path``.

    Args:
        path: a pipeline config (see :mod:`imgcurate.pipeline`).
        measure: also time the embedder's forward pass and the matrix-product speed on this machine (seconds).

    Raises:
        FileNotFoundError: the input folder holds no shards.
        ValueError: the config is invalid.
    """
    from imgcurate.pipeline import Pipeline

    pipeline = Pipeline.from_yaml(path)
    if not pipeline.input:
        raise ValueError(f"{path}: the config has no 'input' folder")
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
