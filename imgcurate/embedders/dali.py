"""The DALI image loader: DALI's webdataset reader, GPU decoding (``mixed``) and GPU resize/crop/normalise.

Imported only when the ``dali`` decoder is chosen (nvidia-dali is an optional dependency, part of the ``gpu`` extra).
With ``device="cpu"`` the same pipeline runs on the CPU (``device_id=None``), which is how the tests exercise it on
machines without a GPU.

DALI reads every sample of the tar; the sample key comes from each image's ``source_info``
(``<tar>:<offset>:<member>``), so rows removed from the metadata are read past and the metadata order is checked
against the tar first. DALI stops a whole batch when one image in it cannot be decoded; the loader then hands the
rest of the shard to its fallback loader (torchvision or PIL), which records the failure for that one row. A
pipeline that cannot be *built* (a DALI too old for an argument, no GPU for ``mixed``) is an error, never a silent
fallback: otherwise every shard would quietly decode on the slower path.

DALI >= 2.2 is required (:data:`DALI_MIN_VERSION`): before it ``decoders.image`` has no
``adjust_orientation``. One pipeline is built per shard, because DALI's readers bind their file list when the
pipeline is built; reusing one across shards would mean feeding the bytes through ``external_source`` instead of
DALI's own reader (and its index files).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

from imgcurate.embedders.loaders import Batch, ResizeCrop
from imgcurate.errors import MissingDependencyError, ShardError
from imgcurate.io.index import index_path_for
from imgcurate.io.tar import IMAGE_EXTENSIONS, NO_SAMPLE, missing_rows, read_keys, split_member_name

__all__ = ["DaliLoader", "DALI_MIN_VERSION", "check_dali_version", "index_path_for"]

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
    """Reads, decodes and preprocesses one shard with an NVIDIA DALI pipeline.

    Args:
        spec: the preprocessing (resize shorter side, centre crop, mean/std).
        batch_size: images per DALI batch.
        num_threads: DALI CPU threads.
        device: ``cuda[:N]`` (GPU decoding) or ``cpu`` (CPU pipeline, for tests and GPU-less machines).
        use_index_files: read through ``<shard>.idx`` (made by DALI's ``wds2idx``) instead of scanning the tar.
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

    def _pipeline(self, tar: str) -> Any:
        import torch
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        gpu = self.device.startswith("cuda")
        index = None
        if self.use_index_files:
            index = index_path_for(tar)
            if not os.path.exists(index):
                raise ShardError(
                    index,
                    f"DALI index file not found for {tar}; write the folder's indexes with `imgcurate index "
                    f"{os.path.dirname(tar) or '.'}` (or DALI's `wds2idx {tar} {index}`)",
                )
        interp = {
            "bicubic": types.INTERP_CUBIC,
            "bilinear": types.INTERP_LINEAR,
            "nearest": types.INTERP_NN,
        }[self.spec.interpolation]
        spec = self.spec
        exif = self.exif_transpose

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=(torch.device(self.device).index or 0) if gpu else None,
            prefetch_queue_depth=2,
        )
        def pipe():
            data = fn.readers.webdataset(
                paths=[tar],
                index_paths=[index] if index else None,
                ext=[";".join(IMAGE_EXTENSIONS)],
                case_sensitive_extensions=False,
                missing_component_behavior="skip",
                name="reader",
            )
            info = fn.get_property(data, key="source_info")
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
            images = fn.crop_mirror_normalize(
                images,
                crop=spec.crop,
                crop_pos_x=pos_x,
                crop_pos_y=pos_y,
                mean=[255.0 * m for m in spec.mean],
                std=[255.0 * s for s in spec.std],
                dtype=types.FLOAT,
                output_layout="CHW",
            )
            return images, info

        pipeline = pipe()
        pipeline.build()
        return pipeline

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
        import numpy as np

        if not keys:  # every row of this shard was filtered out: nothing to read
            return
        if "://" in tar and not tar.startswith("file://"):  # DALI reads local files only
            yield from self.fallback.batches(tar, keys, storage_options, skip)
            return
        absent = missing_rows(tar, keys, read_keys(tar, storage_options=storage_options))
        row_of = {key: row for row, key in enumerate(keys)}
        done: set[int] = set(skip) | absent
        if absent - set(skip):  # img2dataset's failed downloads: rows without a sample in the tar
            yield Batch([], None, {row: NO_SAMPLE for row in sorted(absent - set(skip))})
        try:
            pipeline = self._pipeline(tar)
            runs = math.ceil(pipeline.epoch_size("reader") / self.batch_size)
        except ShardError:
            raise
        except Exception as err:  # a pipeline DALI cannot build fails every shard alike: say so, do not fall back
            raise RuntimeError(f"{tar}: cannot build the DALI pipeline on {self.device}: {_first_line(err)}") from err
        try:
            for _ in range(runs):
                images, info = pipeline.run()
                rows, picks = [], []
                for i in range(len(info)):
                    source = bytes(np.asarray(info.at(i))).decode()
                    member = source[len(tar) + 1 :].partition(":")[2]
                    row = row_of.get(split_member_name(member)[0])
                    if row is not None and row not in done:  # rows filtered out, and the last batch's wrap-around
                        rows.append(row)
                        picks.append(i)
                        done.add(row)
                if rows:
                    tensor = self._to_torch(images)
                    yield Batch(rows, tensor if len(picks) == len(info) else tensor[picks])
        except Exception as err:  # DALI stops on a bad image; the rest of the shard goes through the fallback
            if self.fallback is None:
                raise
            warnings.warn(
                f"{tar}: DALI failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"decoding the remaining {len(keys) - len(done)} samples with {type(self.fallback).__name__}",
                stacklevel=2,
            )
            yield from self.fallback.batches(tar, keys, storage_options, frozenset(done))
            return
        missing = {row: "sample has no image member" for row in range(len(keys)) if row not in done}
        if missing:
            yield Batch([], None, missing)
