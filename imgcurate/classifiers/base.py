"""ImageClassifier: a small model run on an embedding column, adding a score column."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._models import cached_model, resolve_device
from imgcurate.backends import with_columns

if TYPE_CHECKING:
    import torch

    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ImageClassifier"]


class ImageClassifier(abc.ABC):
    """Base class of the classifiers on embeddings.

    It reads ``embedding_column``, checks each embedding's length, runs the model in batches on the CPU or GPU and
    adds ``pred_column`` with the declared type. Null embeddings (failed decodes) give null scores. A subclass only
    loads its model (:meth:`load_model`) and may post-process its output (:meth:`postprocess`).

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

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Turns the model output into one score per row (default: squeeze the last axis)."""
        return output.reshape(output.shape[0], -1)[:, 0]

    def cache_key(self) -> tuple:
        return (type(self).__qualname__,)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores a (N, D) float32 array of embeddings; returns N scores of ``pred_type``."""
        import torch

        device = resolve_device(self.device)
        model = cached_model((*self.cache_key(), device), lambda: self.load_model(device))
        out = []
        with torch.inference_mode():
            for start in range(0, len(embeddings), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + self.batch_size]))
                out.append(self.postprocess(model(batch.to(device).float())).float().cpu().numpy())
        return np.concatenate(out).astype(self.pred_type) if out else np.zeros(0, self.pred_type)

    def predict_column(self, column: pd.Series, source: str | None = None) -> pd.Series:
        """Scores a column of embeddings (arrays or None); null embeddings give null scores.

        Raises:
            ValueError: an embedding's length is not ``embedding_size``, naming the embedder/classifier pair.
        """
        present = column.notna().to_numpy()
        scores = np.full(len(column), np.nan, dtype=self.pred_type)
        if present.any():
            rows = [np.asarray(v, dtype=np.float32) for v in column[present]]
            lengths = {len(r) for r in rows}
            if lengths != {self.embedding_size}:
                found = ", ".join(str(n) for n in sorted(lengths))
                origin = f"{source} " if source else ""
                raise ValueError(
                    f"{type(self).__name__} expects {self.embedding_size}-d embeddings but the {origin}embeddings in "
                    f"{self.embedding_column!r} are {found}-d: pair it with a matching embedder (e.g. a 768-d "
                    "CLIP ViT-L/14 head cannot score 512-d ViT-B/32 embeddings)"
                )
            scores[present] = self.predict(np.stack(rows))
        return pd.Series(scores, index=column.index, dtype=self.pred_type)

    def _partition(self, part: Any) -> Any:
        embeddings = part[self.embedding_column]
        embeddings = embeddings if isinstance(embeddings, pd.Series) else embeddings.to_pandas()
        return with_columns(part, {self.pred_column: self.predict_column(embeddings)}, self._arrow_types())

    def _arrow_types(self) -> dict[str, pa.DataType]:
        return {self.pred_column: pa.from_numpy_dtype(np.dtype(self.pred_type))}

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Adds ``pred_column`` to the dataset's metadata, lazily."""
        df = dataset.metadata
        if self.embedding_column not in df.columns:
            raise ValueError(
                f"{type(self).__name__} needs the embedding column {self.embedding_column!r}; run an embedder first "
                f"(columns: {', '.join(map(str, df.columns))})"
            )
        meta = with_columns(df._meta, {self.pred_column: np.zeros(0, dtype=self.pred_type)}, self._arrow_types())
        out = df.map_partitions(self._partition, meta=meta, enforce_metadata=False)
        return dataset.with_metadata(out, arrow_types=self._arrow_types())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pred_column={self.pred_column!r}, embedding_size={self.embedding_size})"
