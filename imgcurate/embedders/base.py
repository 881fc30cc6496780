"""ImageEmbedder: reads each shard in order, decodes, batches, runs a model and adds an embedding column.

A subclass says how to load its model on a device (:meth:`ImageEmbedder.load_model`) and how to turn a decoded RGB
image into a tensor (:meth:`ImageEmbedder.preprocess`). The base class does the rest for every subclass.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._models import cached_model, resolve_device
from imgcurate.dataset import partition_number
from imgcurate.io.tar import aligned_images

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from imgcurate.classifiers.base import ImageClassifier
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ImageEmbedder"]


class ImageEmbedder(abc.ABC):
    """Base class of the embedders: adds a fixed-length float32 embedding column, one row per metadata row.

    Args:
        image_embedding_column: the output column (a list of float32 per row; null when the image failed).
        batch_size: images per forward pass.
        num_threads_per_worker: decoding threads per Dask worker, overlapping with the model.
        normalize_embeddings: L2-normalise each embedding.
        classifiers: :class:`~imgcurate.classifiers.ImageClassifier` objects run on the fresh embeddings in the
            same pass (no second read of the shards).
        device: ``auto`` (cuda when torch sees a GPU), ``cpu`` or ``cuda[:N]``.
        autocast: run the model under autocast (bf16) on CUDA; ignored on the CPU.
        error_column: where per-sample decode errors go (default ``<image_embedding_column>_error``).
    """

    def __init__(
        self,
        *,
        image_embedding_column: str = "image_embedding",
        batch_size: int = 64,
        num_threads_per_worker: int = 4,
        normalize_embeddings: bool = True,
        classifiers: Sequence[ImageClassifier] = (),
        device: str = "auto",
        autocast: bool = True,
        error_column: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.image_embedding_column = image_embedding_column
        self.batch_size = batch_size
        self.num_threads_per_worker = max(1, num_threads_per_worker)
        self.normalize_embeddings = normalize_embeddings
        self.classifiers = list(classifiers)
        self.device = device
        self.autocast = autocast
        self.error_column = error_column or f"{image_embedding_column}_error"
        for clf in self.classifiers:
            if clf.embedding_column != image_embedding_column:
                raise ValueError(
                    f"{type(clf).__name__} reads {clf.embedding_column!r} but this embedder writes "
                    f"{image_embedding_column!r}"
                )

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def load_model(self, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Loads the model on ``device``, in eval mode; it maps a batch (N, C, H, W) to embeddings (N, D)."""

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Turns a decoded RGB image into the model's input tensor (C, H, W)."""

    def cache_key(self) -> tuple:
        """What identifies the loaded model in the per-worker cache (override when loading depends on more)."""
        return (type(self).__qualname__,)

    def draft_size(self) -> int | None:
        """Smallest side the decoder must keep for JPEG draft decoding; None decodes at full size."""
        return None

    # ------------------------------------------------------------------ running
    def model(self, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model for ``device``, loaded once per worker process."""
        return cached_model((*self.cache_key(), device), lambda: self.load_model(device))

    def _decode(self, item: tuple[bytes | None, str | None]) -> tuple[Any, str | None]:
        from imgcurate.embedders.decode import decode_rgb

        data, error = item
        if data is None:
            return None, error
        try:
            return self.preprocess(decode_rgb(data, self.draft_size())), None
        except Exception as err:  # any decoder failure is recorded for this sample, the job goes on
            return None, f"cannot decode image: {type(err).__name__}: {err}"

    def _forward(self, model: Callable, batch: torch.Tensor, device: str) -> np.ndarray:
        import torch

        with torch.inference_mode():
            batch = batch.to(device, non_blocking=True)
            if self.autocast and device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(batch)
            else:
                out = model(batch)
            out = out.float()
            if self.normalize_embeddings:
                out = torch.nn.functional.normalize(out, dim=-1)
            return out.cpu().numpy()

    def embed_images(
        self, items: Iterator[tuple[bytes | None, str | None]]
    ) -> Iterator[tuple[np.ndarray | None, str | None]]:
        """Embeds a stream of (image bytes, error) pairs; yields (embedding or None, error or None) in order.

        Decoding runs in a thread pool that stays ``2 * batch_size`` images ahead of the model.
        """
        import torch

        device = resolve_device(self.device)
        model = self.model(device)
        window = 2 * self.batch_size
        with concurrent.futures.ThreadPoolExecutor(self.num_threads_per_worker) as pool:
            pending: collections.deque = collections.deque()
            items = iter(items)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                    else:
                        pending.append(pool.submit(self._decode, item))
                if not pending:
                    return
                decoded = [pending.popleft().result() for _ in range(min(self.batch_size, len(pending)))]
                good = [t for t, _ in decoded if t is not None]
                vectors = iter(self._forward(model, torch.stack(good), device)) if good else iter(())
                for tensor, error in decoded:
                    yield (next(vectors), None) if tensor is not None else (None, error)

    def _embed_partition(self, part: Any, tar_files: list[str], id_col: str, so: dict, partition_info=None) -> Any:
        from imgcurate.backends import get_backend

        is_pandas = isinstance(part, pd.DataFrame)
        frame = part if is_pandas else get_backend("cudf").to_pandas(part)
        tar = tar_files[partition_number(partition_info)]
        keys = frame[id_col].tolist()
        embeddings: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for vector, error in self.embed_images(aligned_images(tar, keys, so)):
            embeddings.append(vector)
            errors.append(error)
        out = frame.copy()
        out[self.image_embedding_column] = pd.Series(embeddings, index=frame.index, dtype=object)
        out[self.error_column] = pd.Series(errors, index=frame.index, dtype=pd.StringDtype("pyarrow", na_value=np.nan))
        for clf in self.classifiers:
            out[clf.pred_column] = clf.predict_column(out[self.image_embedding_column], source=type(self).__name__)
        return out if is_pandas else _to_backend_frame(out, part, self.arrow_types())

    def output_meta(self, meta: Any) -> Any:
        """The metadata frame's ``meta`` after this step."""
        extra = {self.image_embedding_column: pd.Series([], dtype=object), self.error_column: _empty_str()}
        for clf in self.classifiers:
            extra[clf.pred_column] = pd.Series([], dtype=clf.pred_type)
        if isinstance(meta, pd.DataFrame):
            return meta.assign(**extra)
        return _to_backend_frame(_as_pandas(meta).assign(**extra), meta, self.arrow_types())

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Adds the embedding column (and the classifiers' columns) to the dataset's metadata, lazily."""
        df = dataset.metadata
        meta = self.output_meta(df._meta)
        out = df.map_partitions(
            self._embed_partition,
            dataset.tar_files,
            dataset.id_col,
            dataset.storage_options,
            meta=meta,
            enforce_metadata=False,
            align_dataframes=False,
        )
        return dataset.with_metadata(out, arrow_types=self.arrow_types())

    def arrow_types(self) -> dict[str, pa.DataType]:
        """Arrow types of the columns this step adds."""
        types = {self.image_embedding_column: pa.list_(pa.float32()), self.error_column: pa.string()}
        for clf in self.classifiers:
            types[clf.pred_column] = pa.from_numpy_dtype(np.dtype(clf.pred_type))
        return types


def _empty_str() -> pd.Series:
    return pd.Series([], dtype=pd.StringDtype("pyarrow", na_value=np.nan))


def _as_pandas(frame: Any) -> pd.DataFrame:
    return frame if isinstance(frame, pd.DataFrame) else frame.to_pandas()


def _to_backend_frame(frame: pd.DataFrame, like: Any, arrow_types: dict[str, pa.DataType]) -> Any:
    """A pandas frame converted to the (cuDF) backend of ``like``, array columns typed by ``arrow_types``."""
    from imgcurate.backends import get_backend
    from imgcurate.io.export import partition_to_arrow

    return get_backend("cudf").from_arrow(partition_to_arrow(frame, arrow_types))
