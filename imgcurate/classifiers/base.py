"""ImageClassifier: a small model run on an embedding column, adding a score column."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._dask import Shard
from imgcurate._models import cached_model, resolve_device
from imgcurate.backends import arrow_type_of, embedding_matrix, not_embeddings
from imgcurate.steps.base import ColumnError, ShardIO, ShardStep

if TYPE_CHECKING:
    import torch

__all__ = ["ImageClassifier", "head_size", "pick_head", "check_head_file"]


class ImageClassifier(ShardStep):
    """Base class of the classifiers on embeddings.

    It reads ``embedding_column``, checks each embedding's length, runs the model in batches on the CPU or GPU and
    adds ``pred_column`` with the declared type. Null embeddings (failed decodes) and embeddings holding NaN or
    infinite values give null scores. With :attr:`normalizes_input` (the LAION heads set it: they were trained on
    L2-normalised CLIP embeddings, and their reference code normalises them) each embedding is L2-normalised first,
    so an embedder run with ``normalize_embeddings=False`` gets the same scores; a head of one's own gets its
    embeddings as they are. A subclass only loads its model (:meth:`load_model`) and may post-process its output
    (:meth:`postprocess`).

    Usable alone (``AestheticClassifier()(dataset)``) or inside an embedder's ``classifiers=[...]`` pass.

    Args:
        embedding_column: the input column of embeddings.
        pred_column: the output column.
        pred_type: the output dtype (e.g. ``float32``).
        batch_size: embeddings per forward pass.
        embedding_size: the embedding length the model expects.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
    """

    def __init__(
        self,
        embedding_column: str,
        pred_column: str,
        pred_type: str,
        batch_size: int,
        embedding_size: int,
        device: str = "auto",
    ):
        self.embedding_column = embedding_column
        self.pred_column = pred_column
        self.pred_type = pred_type
        self.batch_size = batch_size
        self.embedding_size = embedding_size
        self.device = device

    @abc.abstractmethod
    def load_model(self, device: str) -> torch.nn.Module:
        """Loads the model on ``device`` in eval mode: (N, embedding_size) float32 -> (N, 1) or (N,)."""

    def published_weights(self) -> Any:
        """The published weight file (:class:`~imgcurate.classifiers.weights.WeightFile`) this classifier loads when
        no ``model_path`` is given, for the head the embeddings need; None when it has none (the default)."""
        return None

    def _default_weights(self) -> Any:
        """The published file to fetch: none with ``model_path``, nor while ``head="auto"`` has not seen the
        embeddings' size (which picks the file)."""
        if getattr(self, "model_path", None) is not None or not getattr(self, "_size_known", True):
            return None
        return self.published_weights()

    def prepare(self) -> None:
        """Downloads the published weights (no ``model_path``) into ``$IMGCURATE_HOME/weights`` once, where the run
        starts: a file that cannot be fetched stops the run before any work, saying where to put it, instead of
        every worker trying the download on its first shard."""
        from imgcurate import config
        from imgcurate.classifiers.weights import cached_weights

        weights = self._default_weights()
        if weights is not None and not config.get("tasks-elsewhere", False):  # else each worker fetches its own
            cached_weights(weights)

    def check_resources(self) -> None:
        """As :meth:`Step.check_resources`; and offline (``HF_HUB_OFFLINE``) the published weights must be in
        ``$IMGCURATE_HOME/weights`` already (a run could not download them)."""
        from imgcurate._models import hf_offline
        from imgcurate.classifiers.weights import cached_weights

        super().check_resources()
        weights = self._default_weights()
        if weights is not None and hf_offline():
            from imgcurate.errors import MissingWeightsError

            try:
                cached_weights(weights, download=False)
            except FileNotFoundError as err:
                raise MissingWeightsError(str(err)) from None

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Turns the model output into one score per row (default: squeeze the last axis)."""
        return output.reshape(output.shape[0], -1)[:, 0]

    gpu = "optional"
    #: 2: embeddings L2-normalised before the head (LAION's heads), rows holding NaN or inf scored null
    results_version = 2
    #: L2-normalise each embedding before the model sees it (a no-op, to float32 rounding, on normalised input).
    normalizes_input = False

    def cache_key(self) -> tuple:
        """What identifies the loaded model in the per-worker cache: by default the whole configuration."""
        return (type(self).__qualname__, self.fingerprint())

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores a (N, D) array of embeddings; returns N scores of ``pred_type``, NaN for a row that holds NaN or
        infinite values (a model may map those to a number: the Keras NSFW head's first layer turns NaN into 0)."""
        import torch

        x = np.array(embeddings, dtype=np.float32)
        scores = np.full(len(x), np.nan, dtype=self.pred_type)
        finite = np.isfinite(x).all(axis=1) if x.ndim == 2 else np.ones(len(x), dtype=bool)
        x = x[finite] if not finite.all() else x
        if self.normalizes_input and len(x):
            norms = np.linalg.norm(x.astype(np.float64), axis=1)  # float64: no overflow for huge finite values
            x = (x / np.maximum(norms, np.finfo(np.float64).tiny)[:, None]).astype(np.float32)
        device = resolve_device(self.device)
        model = cached_model((*self.cache_key(), device), lambda: self.load_model(device))
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + self.batch_size]))
                out.append(self.postprocess(model(batch.to(device).float())).float().cpu().numpy())
        if out:
            scores[finite] = np.concatenate(out).astype(self.pred_type)
        return scores

    def predict_rows(self, matrix: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Scores the rows of a ``(rows, dim)`` matrix; rows where ``valid`` is false get NaN."""
        self.check_dimension(matrix.shape[1] if matrix.ndim == 2 and len(matrix) else self.embedding_size)
        scores = np.full(len(matrix), np.nan, dtype=self.pred_type)
        rows = np.arange(len(matrix)) if valid is None else np.flatnonzero(valid)
        if len(rows):
            scores[rows] = self.predict(matrix[rows])
        return scores

    def check_dimension(self, dim: int, source: str | None = None) -> None:
        """Raises ValueError unless ``dim`` is the embedding length this model expects, naming the pair."""
        if dim != self.embedding_size:
            origin = f"{source} " if source else ""
            raise ValueError(
                f"{type(self).__name__} expects {self.embedding_size}-d embeddings but the {origin}embeddings in "
                f"{self.embedding_column!r} are {dim}-d: pair it with a matching embedder (e.g. a 768-d "
                "CLIP ViT-L/14 head cannot score 512-d ViT-B/32 embeddings)"
            )

    def predict_column(self, column: Any, source: str | None = None) -> pd.Series:
        """Scores a column of embeddings; null embeddings give null (NaN) scores.

        Raises:
            ValueError: an embedding's length is not ``embedding_size``, naming the embedder/classifier pair.
        """
        valid, matrix = embedding_matrix(column, self.embedding_column)
        scores = np.full(len(valid), np.nan, dtype=self.pred_type)
        if valid.any():
            self.check_dimension(matrix.shape[1], source)
            scores[valid] = self.predict(matrix)
        return pd.Series(scores, dtype=self.pred_type)

    # ------------------------------------------------------------------ the step contract
    def input_columns(self, id_col: str) -> list[str]:
        return [self.embedding_column]

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.pred_column: pa.from_numpy_dtype(np.dtype(self.pred_type))}

    def check(self, meta: Any, id_col: str) -> None:
        super().check(meta, id_col)
        dtype = meta[self.embedding_column].dtype
        reason = not_embeddings(dtype, self.embedding_column)
        if reason is not None:
            raise ColumnError(f"{self.name}: {reason}")
        arrow_type = arrow_type_of(dtype)
        if arrow_type is not None and pa.types.is_fixed_size_list(arrow_type):
            self.check_dimension(arrow_type.list_size)

    def process(self, part: Any, shard: Shard, io: ShardIO) -> dict[str, Any]:
        return {self.pred_column: self.predict_column(part[self.embedding_column]).to_numpy()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pred_column={self.pred_column!r}, embedding_size={self.embedding_size})"


def head_size(heads: dict[str, tuple], head: str, owner: str) -> int:
    """The embedding size of a named head (``auto``: the first one's), or ValueError listing the choices."""
    if head == "auto":
        return next(iter(heads.values()))[0]
    if head not in heads:
        choices = ", ".join(f"{name} ({spec[0]}-d)" for name, spec in heads.items())
        raise ValueError(f"{owner}: unknown head {head!r}; choose auto or one of {choices}")
    return heads[head][0]


def pick_head(heads: dict[str, tuple], head: str, dim: int, current: int) -> int:
    """With ``head="auto"``, the size of the head for ``dim``-d embeddings when one exists; else ``current``."""
    if head == "auto" and any(spec[0] == dim for spec in heads.values()):
        return dim
    return current


def check_head_file(
    heads: dict[str, tuple], size: int, path: str, shapes: dict[str, tuple[int, ...]], what: str,
    any_size: bool = False,
) -> None:  # fmt: skip
    """Checks a head's weight file against the head for ``size``-d embeddings by its tensors' names and shapes (read
    at check time from the file's header, before any work; again when it loads).

    Args:
        heads: the classifier's table, name -> (embedding size, layers factory or None, published weights).
        size: the embedding size the classifier scores.
        path: the file (named in the error).
        shapes: its tensors' shapes by name (``model.`` and ``module.`` prefixes removed).
        what: the classifier, as the error names it (``the aesthetic predictor``).
        any_size: the embedding size is not known yet (``head="auto"`` before the column check): a file of any of
            the heads passes.

    Raises:
        WeightFileError: naming the file and, when it is another head's file, the embedding size it is for.
    """
    from imgcurate.errors import WeightFileError

    if any_size and any(spec[1] is not None and shapes == _head_shapes(spec[1], spec[0]) for spec in heads.values()):
        return
    name, (_, layers, _) = next((n, h) for n, h in heads.items() if h[0] == size)
    if layers is None:
        others = ", ".join(f"{n} ({h[0]}-d)" for n, h in heads.items() if h[1] is not None)
        raise WeightFileError(
            path,
            f"a state dict, but {what}'s {name} head (for {size}-d embeddings) is read from a Keras SavedModel "
            f"(a folder or a zip of one); a state dict fits the {others} heads",
        )
    expected = _head_shapes(layers, size)
    if shapes == expected:
        return
    for other, (other_size, other_layers, _) in heads.items():
        if other_layers is not None and other_size != size and shapes == _head_shapes(other_layers, other_size):
            raise WeightFileError(
                path,
                f"{what}'s {other} head, for {other_size}-d embeddings, but the embeddings here are {size}-d (the "
                f"{name} head): pass the {name} head's file, or score {other_size}-d embeddings",
            )
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {list(shapes[k])} (expected {list(v)})" for k, v in expected.items() if shapes.get(k, v) != v]
    detail = "; ".join(
        f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong))
        if items
    )
    raise WeightFileError(path, f"not {what}'s weights for the {name} head ({size}-d embeddings): {detail}")


def _head_shapes(layers: Any, size: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a head's state dict, from its layers built on torch's meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = layers(size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
