"""The DALI image loader: GPU decoding (``mixed``) and GPU resize/crop/normalise, one pipeline reused across shards.

Imported only when the ``dali`` decoder is chosen (nvidia-dali is an optional dependency, part of the ``gpu`` extra).
With ``device="cpu"`` the same pipeline runs on the CPU (``device_id=None``), which is how the tests exercise it on
machines without a GPU.

The pipeline takes the encoded images through ``fn.external_source``: imgcurate's tar reader reads each shard's
image bytes in metadata order (rows removed from the metadata are read past, rows without a sample or an image get
their error), and a thread runs the pipeline on them two batches ahead of the model. So the pipeline does not
depend on the shard, and each thread keeps one per configuration (device, batch size, DALI threads, output size and
normalisation, EXIF rule) for all the shards it embeds, instead of building one per shard (:func:`cached_pipelines`).
DALI's own webdataset reader would bind the file list when the pipeline is built. ``use_index_files`` still requires
each shard's ``.idx`` (configurations written for DALI's reader keep failing early the same way), but the bytes come
from imgcurate's reader, which seeks past the members it does not need.

Each image's header is read with PIL first (:func:`~imgcurate.embedders.decode.check_header`): one declaring more
pixels than PIL decodes is that row's error and never reaches DALI, which would allocate what the header declares.
DALI stops a whole batch when one image in it cannot be decoded; the loader then drops that pipeline (the next shard
builds a fresh one) and hands the rest of the shard to its fallback loader (torchvision or PIL), which records the
failure for that one row. A pipeline that cannot be *built* (a DALI too old for an argument, no GPU for ``mixed``)
is an error, never a silent fallback: otherwise every shard would quietly decode on the slower path.

DALI >= 2.2 is required (:data:`DALI_MIN_VERSION`): before it ``decoders.image`` has no ``adjust_orientation``.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from imgcurate.embedders.decode import check_header, decode_rgb, orientation_only_in_xmp
from imgcurate.embedders.loaders import Batch, ResizeCrop, _decode_error, _prefetch, resize_crop
from imgcurate.errors import MissingDependencyError, ShardError
from imgcurate.io.index import index_path_for
from imgcurate.io.tar import aligned_images

__all__ = ["DaliLoader", "DALI_MIN_VERSION", "check_dali_version", "cached_pipelines", "index_path_for"]

_THREAD = threading.local()


def cached_pipelines() -> dict[tuple, Any]:
    """The calling thread's built pipelines, by :meth:`DaliLoader.pipeline_key`. One Dask worker thread embeds one
    shard at a time, so a pipeline is never run by two shards at once; pipelines go when their thread ends."""
    if not hasattr(_THREAD, "pipelines"):
        _THREAD.pipelines = {}
    return _THREAD.pipelines


class _DaliRunError(Exception):
    """DALI failed on a batch (raised by the decoding thread, handled by falling back)."""


#: The first DALI whose ``decoders.image`` takes ``adjust_orientation`` (the pipeline below passes it).
DALI_MIN_VERSION = (2, 2)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.4.0"`` -> ``(2, 4, 0)``; non-digits in a part are ignored (``"2.2.0dev"`` -> ``(2, 2, 0)``)."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _crop_pos(size: Any, crop: int) -> Any:
    """DALI's normalised crop position that puts the window where torchvision's centre crop does.

    torchvision starts the window at ``round((size - crop) / 2)``, rounding halves to even; DALI multiplies the
    normalised position by ``size - crop``. Integer arithmetic on DALI data nodes, one value per sample.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    room = size - crop
    half = room // 2
    odd = room - 2 * half
    start = half + odd * (half - 2 * (half // 2))  # a .5 goes to the even neighbour
    return fn.cast(start, dtype=types.FLOAT) / fn.cast(dmath.max(room, 1), dtype=types.FLOAT)


def check_dali_version() -> str:
    """The installed DALI version; raises when it is older than the loader needs.

    Raises:
        MissingDependencyError: DALI is older than :data:`DALI_MIN_VERSION`.
    """
    import nvidia.dali

    version = str(getattr(nvidia.dali, "__version__", "0"))
    if version_tuple(version) < DALI_MIN_VERSION:
        floor = ".".join(map(str, DALI_MIN_VERSION))
        raise MissingDependencyError(
            f"decoding with DALI (nvidia-dali {version} is installed; decoders.image takes adjust_orientation from "
            f"{floor} on)",
            f"nvidia-dali-cuda130>={floor}",
            extra="gpu",
        )
    return version


class DaliLoader:
    """Decodes and preprocesses one shard with an NVIDIA DALI pipeline, the thread's own for this configuration.

    Args:
        spec: the preprocessing (resize shorter side, centre crop, mean/std).
        batch_size: images per DALI batch.
        num_threads: DALI CPU threads.
        device: ``cuda[:N]`` (GPU decoding) or ``cpu`` (CPU pipeline, for tests and GPU-less machines).
        use_index_files: require ``<shard>.idx`` beside each shard (made by ``imgcurate index`` or DALI's
            ``wds2idx``), as DALI's reader did; the bytes are read by imgcurate's tar reader either way.
        fallback: the loader that takes over the rest of a shard when DALI fails on it.
        exif_transpose: apply the EXIF orientation. DALI's ``peek_image_shape`` applies it by default while its
            decoder is told here what to do, so both get the same ``adjust_orientation`` (otherwise the resize and
            crop would be computed on a rotated shape).
    """

    def __init__(
        self,
        spec: ResizeCrop,
        batch_size: int,
        num_threads: int,
        device: str,
        use_index_files: bool = False,
        fallback: Any = None,
        exif_transpose: bool = False,
    ):
        check_dali_version()  # fail here, when the step is built, if DALI is missing or too old

        self.spec = spec
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = device
        self.use_index_files = use_index_files
        self.fallback = fallback
        self.exif_transpose = exif_transpose

    def pipeline_key(self) -> tuple:
        """Everything that defines the pipeline: two loaders with equal keys share one (per thread)."""
        return (self.device, self.batch_size, self.num_threads, self.spec, self.exif_transpose)

    def _build(self) -> Any:
        import torch
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        gpu = self.device.startswith("cuda")
        interp = {
            "bicubic": types.INTERP_CUBIC,
            "bilinear": types.INTERP_LINEAR,
            "nearest": types.INTERP_NN,
        }[self.spec.interpolation]
        spec = self.spec
        exif = self.exif_transpose

        # prefetch_queue_depth=1: each run takes the batch fed to it; running ahead of the model is the decoding
        # thread's job (see batches), as the reader's prefetching was when DALI read the tar itself
        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=(torch.device(self.device).index or 0) if gpu else None,
            prefetch_queue_depth=1,
        )
        def pipe():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # the resized size as torchvision computes it (shorter side exact, longer side truncated), not DALI's
            # rounding: a pixel of difference on the longer side would shift the whole crop by a fraction of a pixel
            shape = fn.peek_image_shape(data, adjust_orientation=exif)
            height, width = shape[0], shape[1]
            shorter = dmath.min(height, width)
            new_h, new_w = height * spec.shorter // shorter, width * spec.shorter // shorter
            size_y, size_x = fn.cast(new_h, dtype=types.FLOAT), fn.cast(new_w, dtype=types.FLOAT)
            pos_y, pos_x = _crop_pos(new_h, spec.crop[0]), _crop_pos(new_w, spec.crop[1])
            images = fn.decoders.image(
                data, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=exif
            )
            images = fn.resize(images, resize_x=size_x, resize_y=size_y, interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(
                images,
                crop=spec.crop,
                crop_pos_x=pos_x,
                crop_pos_y=pos_y,
                mean=[255.0 * m for m in spec.mean],
                std=[255.0 * s for s in spec.std],
                dtype=types.FLOAT,
                output_layout="CHW",
            )

        pipeline = pipe()
        pipeline.build()
        return pipeline

    def _pipeline(self, tar: str) -> Any:
        """This thread's pipeline for this configuration, built on first use."""
        cache = cached_pipelines()
        key = self.pipeline_key()
        if key not in cache:
            try:
                cache[key] = self._build()
            except Exception as err:  # a pipeline DALI cannot build fails every shard alike: say so, no fallback
                raise RuntimeError(
                    f"{tar}: cannot build the DALI pipeline on {self.device}: {_first_line(err)}"
                ) from err
        return cache[key]

    def _to_torch(self, images: Any) -> Any:
        import numpy as np
        import torch

        if not self.device.startswith("cuda"):
            return torch.from_numpy(np.array(images.as_array()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = images.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out

    def batches(self, tar: str, keys: list[str], storage_options: dict | None, skip=frozenset()) -> Iterator[Batch]:
        """The batches of one shard's metadata ``keys``; rows in ``skip`` are read past."""
        if not keys:  # every row of this shard was filtered out: nothing to read
            return
        if self.use_index_files:
            import fsspec

            index = index_path_for(tar)
            fs, path = fsspec.core.url_to_fs(index, **(storage_options or {}))
            if not fs.exists(path):
                raise ShardError(
                    index,
                    f"DALI index file not found for {tar}; write the folder's indexes with `imgcurate index "
                    f"{os.path.dirname(tar) or '.'}` (or DALI's `wds2idx {tar} {index}`)",
                )
        pipeline = self._pipeline(tar)
        done: set[int] = set(skip)
        try:
            for batch in _prefetch(self._decoded(pipeline, tar, keys, storage_options, skip)):
                done.update(batch.rows)
                done.update(batch.errors)
                yield batch
        except _DaliRunError as err:  # DALI stops on a bad image; the rest of the shard goes through the fallback
            cached_pipelines().pop(self.pipeline_key(), None)  # a pipeline that failed is not run again
            cause = err.__cause__ or err
            if self.fallback is None:
                raise cause from None
            warnings.warn(
                f"{tar}: DALI failed ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
                f"decoding the remaining {len(keys) - len(done)} samples with {type(self.fallback).__name__}",
                stacklevel=2,
            )
            yield from self.fallback.batches(tar, keys, storage_options, frozenset(done))

    def _pil_row(self, row: int, data: bytes) -> Batch:
        """One row decoded by PIL (EXIF or XMP orientation applied) and preprocessed with tensor operations."""
        import numpy as np
        import torch

        try:
            image = decode_rgb(data, exif_transpose=True)
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(self.device)
            return Batch([row], resize_crop(self.spec, tensor)[None])
        except Exception as err:
            return Batch([], None, {row: _decode_error(err)})

    def _decoded(
        self, pipeline: Any, tar: str, keys: list[str], storage_options: dict | None, skip: frozenset
    ) -> Iterator[Batch]:
        """Reads the shard and runs ``pipeline`` on it, one batch at a time (in the decoding thread)."""
        import numpy as np

        rows: list[int] = []
        encoded: list[np.ndarray] = []

        def run() -> Batch:
            try:
                (images,) = pipeline.run(encoded=encoded)
                tensor = self._to_torch(images)
            except Exception as err:
                raise _DaliRunError(f"{tar}: DALI failed on a batch") from err
            return Batch(list(rows), tensor)

        for row, (data, error) in enumerate(aligned_images(tar, keys, storage_options)):
            if row in skip:
                continue
            if data is None:  # img2dataset's failed downloads, samples without an image member
                yield Batch([], None, {row: error})
                continue
            try:  # DALI allocates whatever size a header declares
                check_header(data)
            except Exception as err:
                yield Batch([], None, {row: _decode_error(err)})
                continue
            if self.exif_transpose and orientation_only_in_xmp(data):  # DALI reads EXIF only; PIL reads XMP too
                yield self._pil_row(row, data)
                continue
            rows.append(row)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            if len(rows) == self.batch_size:
                yield run()
                rows, encoded = [], []
        if rows:
            yield run()
