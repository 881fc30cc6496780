"""ImageEmbedder: reads each shard in order, decodes, batches, runs a model and adds an embedding column.

A subclass says how to load its model on a device (:meth:`ImageEmbedder.load_model`) and how to turn a decoded RGB
image into a tensor (:meth:`ImageEmbedder.preprocess`). The base class does the rest for every subclass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from imgcurate._dask import Shard
from imgcurate._models import cached_model, resolve_device
from imgcurate.backends import embedding_array, embedding_type, to_pandas
from imgcurate.steps.base import Requirement, ShardIO, ShardStep

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from imgcurate.classifiers.base import ImageClassifier
    from imgcurate.embedders.loaders import ResizeCrop

__all__ = ["ImageEmbedder"]


class ImageEmbedder(ShardStep):
    """Base class of the embedders: adds a fixed-length float32 embedding column, one row per metadata row.

    A step that reads images: each task reads its own shard's tar, decodes and batches the images (per-sample decode
    errors go to ``error_column``, the embedding is null), runs the model and the fused classifiers.

    Args:
        image_embedding_column: the output column (a list of float32 per row; null when the image failed).
        batch_size: images per forward pass; None picks it for the device (16 on the CPU, where small batches keep
            the activations in cache, 64 on CUDA).
        num_threads_per_worker: decoding threads per Dask worker, overlapping with the model.
        normalize_embeddings: L2-normalise each embedding.
        classifiers: :class:`~imgcurate.classifiers.ImageClassifier` objects run on the fresh embeddings in the
            same pass (no second read of the shards).
        device: ``auto`` (cuda when torch sees a GPU), ``cpu`` or ``cuda[:N]``.
        autocast: run the model under autocast (bf16) on CUDA; ignored on the CPU.
        error_column: where per-sample decode errors go (default ``<image_embedding_column>_error``).
        decoder: ``auto``, ``pil``, ``cpu``, ``torchvision`` or ``dali`` (see :mod:`imgcurate.embedders.loaders`);
            ``auto`` is ``cpu`` on the CPU (per image the fastest decoder that gives PIL's pixels, tensor resize)
            and, on CUDA, DALI when installed, else torchvision's GPU JPEG decoder. ``pil`` is timm's exact path.
        use_index_files: with DALI, read each shard through its ``.idx`` index file.
        exif_transpose: rotate images as their EXIF orientation says, on every decoder (timm's loader does not,
            so the default keeps the pixels timm's eval path sees).
        engine: CPU inference engine, ``auto`` (measure the installed ones on this machine and keep the fastest that
            matches torch fp32), ``torch`` or ``openvino`` (the ``cpu`` extra); see :mod:`imgcurate.embedders.engines`.
            Ignored on CUDA, except that ``openvino`` there is an error.
        precision: ``auto`` (fp32, and bf16 where the CPU computes it natively and the embeddings stay within cosine
            0.9995 of fp32), ``fp32`` or ``bf16``; on the CPU only.
        model_threads: threads of one model call on the CPU; None shares the cores among the Dask threads of the
            process (see :func:`imgcurate.cpu.model_threads`).
    """

    def __init__(
        self,
        *,
        image_embedding_column: str = "image_embedding",
        batch_size: int | None = None,
        num_threads_per_worker: int = 4,
        normalize_embeddings: bool = True,
        classifiers: Sequence[ImageClassifier] = (),
        device: str = "auto",
        autocast: bool = True,
        error_column: str | None = None,
        decoder: str = "auto",
        use_index_files: bool = False,
        exif_transpose: bool = False,
        engine: str = "auto",
        precision: str = "auto",
        model_threads: int | None = None,
    ):
        from imgcurate.embedders.engines import check_choice

        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.image_embedding_column = image_embedding_column
        self.batch_size = batch_size
        self.num_threads_per_worker = max(1, num_threads_per_worker)
        self.normalize_embeddings = normalize_embeddings
        self.classifiers = list(classifiers)
        for i, clf in enumerate(self.classifiers):  # the fused-classifier protocol, not a class: duck typing
            if not all(hasattr(clf, a) for a in ("embedding_column", "pred_column", "output_columns", "predict_rows")):
                raise TypeError(f"classifiers[{i}]: expected a classifier (in YAML: '- AestheticClassifier: {{}}'), "
                                f"got {clf!r}")  # fmt: skip
        if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        self.device = device
        self.autocast = autocast
        self.error_column = error_column or f"{image_embedding_column}_error"
        from imgcurate.embedders.loaders import choose_decoder

        choose_decoder(decoder, "cpu", True)  # checks the name (and that DALI is installed when asked for) now
        self.decoder = decoder
        self.use_index_files = use_index_files
        self.exif_transpose = exif_transpose
        check_choice(engine, precision)
        self.engine = engine
        self.precision = precision
        self.model_threads = model_threads
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

    def tensor_preprocessing(self) -> ResizeCrop | None:
        """``preprocess`` described as tensor operations, for the GPU decoders; None keeps this embedder on PIL."""
        return None

    gpu = "optional"
    #: 2: a sample's image is its first member in IMAGE_EXTENSIONS' order; timm's ``img_size`` sizes the input;
    #: a CLIP tag keeps its QuickGELU with a local checkpoint
    results_version = 2

    def cache_key(self) -> tuple:
        """What identifies the loaded model in the per-worker cache: by default the whole configuration, so two
        differently configured instances never share a model (override to share across irrelevant options)."""
        return (type(self).__qualname__, self.fingerprint())

    def embedding_dim(self) -> int:
        """The embedding's length, known before any image is read (the default loads the model on the CPU once)."""
        cached = self.__dict__.get("_embedding_dim")
        if cached is None:
            import torch
            from PIL import Image

            model = self.model("cpu")
            x = self.preprocess(Image.new("RGB", (256, 256)))[None]
            with torch.inference_mode():
                cached = int(model(x).shape[-1])
            self.__dict__["_embedding_dim"] = cached
        return cached

    def draft_size(self) -> int | None:
        """Smallest side the decoder must keep for JPEG draft decoding; None decodes at full size."""
        return None

    # ------------------------------------------------------------------ running
    def model(self, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model for ``device``, loaded once per worker process; on the CPU on the engine chosen for it."""
        key = (*self.cache_key(), device)
        if device == "cpu":
            key = (*key, self.engine, self.precision)
        return cached_model(key, lambda: self._load(device))

    def batch_size_for(self, device: str) -> int:
        """``batch_size``, or the device's default when it is None."""
        if self.batch_size is not None:
            return self.batch_size
        return 16 if device == "cpu" else 64

    def threads_for_model(self) -> int:
        """Threads of one model call on the CPU: ``model_threads``, else the cores shared among concurrent calls."""
        from imgcurate import cpu

        return self.model_threads or cpu.model_threads()

    def _load(self, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if device != "cpu":
            if self.engine == "openvino":
                raise ValueError(f"engine='openvino' runs on the CPU only, not on {device!r}")
            return self.load_model(device)
        import torch

        warm_up = getattr(self.loader(device), "warm_up", None)
        if warm_up is not None:  # the decoders' imports and first calls: once per process, not in the first shard
            warm_up()

        from imgcurate import config, cpu
        from imgcurate.embedders import engines

        cpu.keep_freed_memory()  # reuse freed activation memory instead of page-faulting it in again each batch
        threads = self.threads_for_model()
        torch.set_num_threads(threads)
        model = self.load_model(device)
        if not isinstance(model, torch.nn.Module):  # a plain callable: run as it is
            return model
        with torch.random.fork_rng(devices=[]):  # the probe's preprocessing may build a model: leave the caller's RNG
            return engines.prepare(
                model,
                engine=self.engine,
                precision=self.precision,
                batch_size=self.batch_size_for(device),
                probe=engines.probe_batch(self.preprocess),
                threads=threads,
                streams=cpu.concurrent_calls(),
                key=repr(self.cache_key()),
                cache_dir=str(config.home() / "engines"),
            )

    def _forward(self, model: Callable, batch: torch.Tensor, device: str) -> np.ndarray:
        import torch

        if device == "cpu":
            threads = self.threads_for_model()
            if torch.get_num_threads() != threads:  # per calling thread with OpenMP
                torch.set_num_threads(threads)
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

    def loader(self, device: str) -> Any:
        """The image loader for ``device``, as ``decoder`` chooses (see :mod:`imgcurate.embedders.loaders`)."""
        from imgcurate.embedders.loaders import choose_decoder, make_loader

        spec = self.tensor_preprocessing()
        name = choose_decoder(self.decoder, device, spec is not None, spec.interpolation if spec else None)
        if name == "pil":
            return make_loader(
                "pil",
                preprocess=self.preprocess,
                batch_size=self.batch_size_for(device),
                num_threads=self.num_threads_per_worker,
                draft_size=self.draft_size(),
                exif_transpose=self.exif_transpose,
            )
        common = {"spec": spec, "batch_size": self.batch_size_for(device), "num_threads": self.num_threads_per_worker}
        common["exif_transpose"] = self.exif_transpose
        if name == "cpu":
            return make_loader("cpu", draft_size=self.draft_size(), **common)
        vision = make_loader("torchvision", device=device, **common)
        if name == "torchvision":
            return vision
        return make_loader("dali", device=device, use_index_files=self.use_index_files, fallback=vision, **common)

    def embed_shard(self, tar: str, keys: list[str], storage_options: dict | None = None) -> tuple[Any, list]:
        """Embeddings and errors for the samples ``keys`` of one shard, in order.

        Returns:
            ``(valid, matrix, errors)``: a bool array (the row has an embedding), the ``(rows, dim)`` float32 matrix
            (zeros where not valid) and the per-row error texts (None where fine).

        Raises:
            AlignmentError: ``keys`` is not an in-order subsequence of the shard's keys.
            ShardError: the tar is unreadable.
        """
        device = resolve_device(self.device)
        model = self.model(device)
        matrix = np.zeros((len(keys), self.embedding_dim()), dtype=np.float32)
        valid = np.zeros(len(keys), dtype=bool)
        errors: list[str | None] = [None] * len(keys)
        for batch in self.loader(device).batches(tar, keys, storage_options):
            for row, error in batch.errors.items():
                errors[row] = error
            if batch.rows:
                rows = np.asarray(batch.rows, dtype=np.int64)
                matrix[rows] = self._forward(model, batch.images, device)
                valid[rows] = True
        return valid, matrix, errors

    # ------------------------------------------------------------------ the step contract
    def worker_requirements(self, backend: str) -> list[Requirement]:
        """As :meth:`Step.worker_requirements`: also the engine and the decoder when they are named (``auto`` takes
        what the worker has)."""
        found = super().worker_requirements(backend)
        if self.engine == "openvino":
            found.append(Requirement("openvino", "openvino", "cpu"))
        if self.decoder == "dali":
            found.append(Requirement("nvidia.dali", "nvidia-dali-cuda130>=2.2", "gpu"))
        return found

    def output_columns(self) -> dict[str, pa.DataType]:
        """The embedding (fixed-size list of float32), its error text, and each fused classifier's score."""
        types = {self.image_embedding_column: embedding_type(self.embedding_dim()), self.error_column: pa.string()}
        for clf in self.classifiers:
            types.update(clf.output_columns())
        return types

    def check(self, meta: Any, id_col: str) -> None:
        super().check(meta, id_col)
        for clf in self.classifiers:
            clf.check_dimension(self.embedding_dim(), source=type(self).__name__)

    def process(self, part: Any, shard: Shard, io: ShardIO) -> dict[str, Any]:
        keys = to_pandas(part[[io.id_col]])[io.id_col].tolist()
        valid, matrix, errors = self.embed_shard(shard.tar, keys, io.storage_options)
        out: dict[str, Any] = {
            self.image_embedding_column: embedding_array(matrix, valid),
            self.error_column: pa.array(errors, pa.string()),
        }
        for clf in self.classifiers:
            out[clf.pred_column] = clf.predict_rows(matrix, valid)
        out.update(self.extra_columns(part, shard, io, valid, matrix))
        return out

    def extra_columns(self, part: Any, shard: Shard, io: ShardIO, valid: np.ndarray, matrix: np.ndarray) -> dict:
        """Further columns a subclass computes in the same pass from the partition and the fresh image embeddings
        (a caption's text embedding and its CLIP score); declare them in :meth:`output_columns`. Default: none."""
        return {}
