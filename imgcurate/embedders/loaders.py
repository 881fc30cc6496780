"""Image loaders: read one shard's images for the metadata rows, decode and preprocess them, in batches.

Four decoders, chosen by name in one table (:data:`DECODERS`):

- ``pil``: PIL (libjpeg-turbo) in a thread pool that runs ahead of the model, with the embedder's own
  ``preprocess`` (for timm models, timm's eval transform): timm's exact path. Also the fallback of the others.
- ``cpu``: the same thread pool, decoding each image with the fastest decoder that gives PIL's pixels
  (:func:`~imgcurate.embedders.decode.decode_tensor`: torchvision's ``decode_jpeg`` for JPEGs at full size, PIL
  for draft-decoded JPEGs and other formats), then resize and crop as torch tensor operations on uint8 pixels; the
  batch is normalised at once when it is assembled (the same floats as image by image). torch's
  antialiased uint8 resize is Pillow's algorithm: the resized pixels differ from PIL's by a level or two at most, in a
  fraction of a percent of them, and decoding and preprocessing take 1.5-2.4x less CPU time on photos larger than
  the model's input (1.8x over a mix of 256-2048 px JPEGs; ``benchmarks/decode.py``). The CPU default.
- ``torchvision``: JPEGs decoded in batches by ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA),
  other formats by PIL; resize, crop and normalisation as tensor operations on that device.
- ``dali``: NVIDIA DALI reads the tar with its webdataset reader (through index files with ``use_index_files``),
  decodes on the GPU (``mixed``) and resizes, crops and normalises there. Imported only when chosen.

``auto`` picks ``cpu`` on the CPU (``pil`` for a ``nearest`` resize, see :data:`CPU_INTERPOLATIONS`), and on CUDA
``dali`` when it is installed, else ``torchvision``. All but ``pil`` need the embedder's preprocessing as a
:class:`ResizeCrop`; an embedder that cannot describe it stays on ``pil``.

A loader yields :class:`Batch` objects: the metadata rows it decoded (with their tensors) and the rows that failed
(with an error message). Every row comes back exactly once, in one or the other.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from imgcurate.embedders.decode import (
    check_header,
    decode_rgb,
    decode_tensor_sized,
    error_text,
    needs_turn,
    orientation_only_in_xmp,
    warm_up_samples,
)
from imgcurate.io.tar import aligned_images

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "Batch",
    "ResizeCrop",
    "PilLoader",
    "CpuLoader",
    "TorchvisionLoader",
    "DECODERS",
    "choose_decoder",
    "make_loader",
    "resize_crop",
    "resize_crop_uint8",
    "normalize",
]


@dataclasses.dataclass
class Batch:
    """Decoded rows of one shard: ``images[i]`` belongs to metadata row ``rows[i]``; ``errors`` maps failed rows
    to their message."""

    rows: list[int]
    images: torch.Tensor | None
    errors: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ResizeCrop:
    """Eval preprocessing as tensor operations: resize the shorter side to ``shorter`` (keeping the aspect ratio),
    centre-crop ``crop`` (height, width), scale to [0, 1] and normalise with ``mean``/``std``.

    This is timm's default eval transform (``crop_mode="center"``) and that of most image models.
    """

    shorter: int
    crop: tuple[int, int]
    interpolation: str  # bicubic | bilinear | nearest
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _decode_error(err: Exception) -> str:
    return f"cannot decode image: {error_text(err)}"


def resize_crop(spec: ResizeCrop, image: torch.Tensor, full_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A (3, H, W) uint8 image -> the model's float input, as ``spec`` says, in torch tensor operations.

    :func:`resize_crop_uint8`, then :func:`normalize`; a batch of crops normalised at once gives the same floats.
    """
    return normalize(spec, resize_crop_uint8(spec, image, full_size))


def resize_crop_uint8(spec: ResizeCrop, image: torch.Tensor, full_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A (3, H, W) uint8 image -> its resized and centre-cropped (3, *crop) uint8 pixels, as ``spec`` says.

    The sizes and the crop window are torchvision's (as timm's and open_clip's transforms compute them on PIL
    images); the resize is antialiased, which for uint8 images on the CPU is Pillow's algorithm ported to torch.
    ``nearest`` is torch's ``nearest-exact``, which is not PIL's choice of pixels (hence not in
    :data:`CPU_INTERPOLATIONS`). ``full_size``: the (width, height) of the image before JPEG draft scaling; the
    resized size is computed from it, as for the full decode (from the drafted size, rounding can make the long
    side a pixel longer and shift the crop by half a pixel).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.NEAREST_EXACT if spec.interpolation == "nearest" else InterpolationMode(spec.interpolation)
    size: list[int] = [spec.shorter]
    if full_size is not None and tuple(full_size) != (image.shape[-1], image.shape[-2]):
        w, h = full_size  # torchvision's rule for one size: the shorter side to it, the longer truncated
        size = [spec.shorter, int(spec.shorter * w / h)] if h <= w else [int(spec.shorter * h / w), spec.shorter]
    image = F.resize(image, size, interpolation=mode, antialias=True)
    return F.center_crop(image, list(spec.crop))


def normalize(spec: ResizeCrop, images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels, (3, H, W) or a batch (N, 3, H, W) -> float32 scaled to [0, 1] and normalised with ``spec``'s
    mean and std: torchvision's ``to_dtype(scale=True)`` and ``normalize``, element by element the same operations,
    so an image gives the same floats alone or in a batch."""
    import torch

    mean = torch.as_tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class PilLoader:
    """CPU decoding with PIL in ``num_threads`` threads, ``2 * batch_size`` images ahead of the consumer.

    Args:
        preprocess: decoded RGB image -> (C, H, W) tensor.
        batch_size: images per batch.
        num_threads: decoding threads.
        draft_size: the size images are resized to, for JPEG draft decoding (see :func:`decode_rgb`); None decodes
            at full size.
        exif_transpose: apply the EXIF orientation (timm's loader does not).
    """

    def __init__(
        self,
        preprocess: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        num_threads: int,
        draft_size: int | None = None,
        exif_transpose: bool = False,
    ):
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.draft_size = draft_size
        self.exif_transpose = exif_transpose

    def convert(self, data: bytes) -> torch.Tensor:
        """One image's bytes -> the model's input tensor (runs in the decoding threads)."""
        return self.preprocess(decode_rgb(data, self.draft_size, self.exif_transpose))

    def _decode(self, data: bytes | None, error: str | None) -> tuple[Any, str | None]:
        if data is None:
            return None, error
        try:
            return self.convert(data), None
        except Exception as err:  # any decoder failure is recorded for this sample, the job goes on
            return None, _decode_error(err)

    def decode_rows(self, items: Iterator[tuple[int, bytes | None, str | None]]) -> Iterator[Batch]:
        """Batches of (row, image bytes or None, error) items, decoded in the thread pool."""

        window = 2 * self.batch_size
        with concurrent.futures.ThreadPoolExecutor(self.num_threads, initializer=_one_torch_thread) as pool:
            pending: collections.deque = collections.deque()
            items = iter(items)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                    else:
                        pending.append((item[0], pool.submit(self._decode, *item[1:])))
                if not pending:
                    return
                batch = Batch([], None)
                tensors = []
                for _ in range(min(self.batch_size, len(pending))):
                    row, future = pending.popleft()
                    tensor, error = future.result()
                    if tensor is None:
                        batch.errors[row] = error
                    else:
                        batch.rows.append(row)
                        tensors.append(tensor)
                batch.images = self.collate(tensors) if tensors else None
                yield batch

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The model's input batch from the decoding threads' outputs (in the consumer's thread)."""
        import torch

        return torch.stack(tensors)

    def warm_up(self) -> None:
        """Decodes a tiny image of each common format once, so that the imports and first-call set-up of the
        decoders (PIL's format plugins, torchvision's kernels) happen when the model is loaded, not in the first
        shard's decoding threads (where they cost every process ~0.2 s of CPU, with the import lock held)."""
        for data in warm_up_samples():
            self.convert(data)

    def batches(self, tar: str, keys: list[str], storage_options: dict | None, skip=frozenset()) -> Iterator[Batch]:
        """The batches of one shard's metadata ``keys`` (rows in ``skip`` are read past, not decoded)."""
        items = (
            (row, data, error)
            for row, (data, error) in enumerate(aligned_images(tar, keys, storage_options))
            if row not in skip
        )
        return self.decode_rows(items)


def _one_torch_thread() -> None:
    """Decoding threads run torch operations one thread each: they are already as many as the cores allow, and
    OpenMP's thread count is a per-thread setting that a new thread would otherwise take from the process."""
    import torch

    torch.set_num_threads(1)


class CpuLoader(PilLoader):
    """:class:`PilLoader`'s threads with the fastest decoder per image and tensor preprocessing (see the module
    docstring): :func:`~imgcurate.embedders.decode.decode_tensor`, then :func:`resize_crop`.

    Args:
        spec: the preprocessing (resize shorter side, centre crop, mean/std).
        batch_size: images per batch.
        num_threads: decoding threads.
        draft_size: as for :class:`PilLoader`.
        exif_transpose: as for :class:`PilLoader` (PIL's ``ImageOps.exif_transpose`` on every decoder).
    """

    def __init__(
        self,
        spec: ResizeCrop,
        batch_size: int,
        num_threads: int,
        draft_size: int | None = None,
        exif_transpose: bool = False,
    ):
        super().__init__(None, batch_size, num_threads, draft_size, exif_transpose)  # type: ignore[arg-type]
        self.spec = spec

    def convert(self, data: bytes) -> torch.Tensor:
        """One image's bytes -> its resized and cropped uint8 pixels (normalised per batch in :meth:`collate`)."""
        return resize_crop_uint8(self.spec, *decode_tensor_sized(data, self.draft_size, self.exif_transpose))

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The uint8 crops stacked and normalised at once: a quarter of the bytes to copy, one pass per operation
        over the batch instead of two allocations per image, and the same floats as :func:`resize_crop`."""
        import torch

        return normalize(self.spec, torch.stack(tensors))


class TorchvisionLoader:
    """JPEGs decoded in batches by torchvision on ``device`` (nvJPEG on CUDA), others by PIL; tensor preprocessing.

    A batch that the batched decoder rejects is decoded image by image, so one bad JPEG fails only its own row;
    a JPEG the device decoder cannot handle (CMYK, say) is retried with PIL before it counts as an error.
    ``exif_transpose`` applies the EXIF orientation (``apply_exif_orientation``; PIL's for the others).
    """

    def __init__(self, spec: ResizeCrop, batch_size: int, num_threads: int, device: str, exif_transpose: bool = False):
        self.spec = spec
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = device
        self.exif_transpose = exif_transpose

    def _pil(self, data: bytes) -> torch.Tensor:
        import numpy as np
        import torch

        image = decode_rgb(data, exif_transpose=self.exif_transpose)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor | Exception]:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Any] = [None] * len(datas)
        jpegs = []
        # torchvision applies the EXIF orientation on the CPU only: on CUDA a turned image goes to PIL
        on_gpu = torch.device(self.device).type == "cuda"
        for i, data in enumerate(datas):
            if data[:3] == b"\xff\xd8\xff":
                try:
                    check_header(data)  # decode_jpeg would allocate whatever size the header declares
                except Exception as err:
                    out[i] = err
                    continue
                # else PIL, which reads XMP too (and turns the image on the device's behalf)
                if not (self.exif_transpose and (orientation_only_in_xmp(data) or (on_gpu and needs_turn(data)))):
                    jpegs.append(i)
        if jpegs:
            encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
            try:
                decoded = decode_jpeg(
                    encoded, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=self.exif_transpose
                )
            except Exception:  # a bad image in the batch: decode one by one to find it
                decoded = []
                for tensor in encoded:
                    try:
                        decoded.append(
                            decode_jpeg(
                                tensor,
                                mode=ImageReadMode.RGB,
                                device=self.device,
                                apply_exif_orientation=self.exif_transpose,
                            )
                        )
                    except Exception as err:
                        decoded.append(err)
            for i, image in zip(jpegs, decoded, strict=True):
                out[i] = image
        for i, data in enumerate(datas):
            if out[i] is None or isinstance(out[i], Exception):
                try:
                    out[i] = self._pil(data).to(self.device, non_blocking=True)
                except Exception as err:
                    out[i] = err
        return out

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return resize_crop(self.spec, image)

    def batches(self, tar: str, keys: list[str], storage_options: dict | None, skip=frozenset()) -> Iterator[Batch]:
        import torch

        def read() -> Iterator[list[tuple[int, bytes | None, str | None]]]:
            group = []
            for row, (data, error) in enumerate(aligned_images(tar, keys, storage_options)):
                if row in skip:
                    continue
                group.append((row, data, error))
                if len(group) == self.batch_size:
                    yield group
                    group = []
            if group:
                yield group

        for group in _prefetch(read()):
            batch = Batch([], None)
            present = [(row, data) for row, data, _ in group if data is not None]
            batch.errors.update({row: error for row, data, error in group if data is None})
            tensors = []
            for (row, _), image in zip(present, self._decode_batch([d for _, d in present]), strict=True):
                if isinstance(image, Exception):
                    batch.errors[row] = _decode_error(image)
                    continue
                try:
                    tensors.append(self._preprocess(image))
                    batch.rows.append(row)
                except Exception as err:
                    batch.errors[row] = _decode_error(err)
            batch.images = torch.stack(tensors) if tensors else None
            yield batch


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Runs ``it`` in a background thread, ``depth`` items ahead (reading the tar overlaps with the model)."""
    import queue

    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as err:  # handed to the consumer
            q.put(err)
        q.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except Exception:
                thread.join(0.01)


#: decoder name -> the loader class (imported lazily for DALI).
DECODERS: dict[str, str] = {
    "pil": "imgcurate.embedders.loaders:PilLoader",
    "cpu": "imgcurate.embedders.loaders:CpuLoader",
    "torchvision": "imgcurate.embedders.loaders:TorchvisionLoader",
    "dali": "imgcurate.embedders.dali:DaliLoader",
}


def dali_installed() -> bool:
    """Whether nvidia-dali can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


#: The interpolations whose antialiased uint8 resize in torch is Pillow's own (``resize_crop`` then stays within a
#: level or two of timm's PIL transform); ``nearest`` is not among them (torch picks other pixels than PIL).
CPU_INTERPOLATIONS = ("bicubic", "bilinear")


def choose_decoder(decoder: str, device: str, has_spec: bool, interpolation: str | None = None) -> str:
    """The decoder that ``auto`` means on ``device`` for an embedder whose preprocessing is a ResizeCrop (or not) with
    ``interpolation``; checks an explicit choice."""
    if decoder not in ("auto", *DECODERS):
        raise ValueError(f"decoder must be auto or one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        if not has_spec:
            return "pil"
        if not device.startswith("cuda"):
            return "cpu" if interpolation in CPU_INTERPOLATIONS else "pil"
        return "dali" if dali_installed() else "torchvision"
    if decoder != "pil" and not has_spec:
        raise ValueError(
            f"decoder={decoder!r} needs the preprocessing as a ResizeCrop (tensor_preprocessing() returned None "
            "for this embedder); use decoder='pil'"
        )
    if decoder == "dali" and not dali_installed():
        from imgcurate.errors import MissingDependencyError

        raise MissingDependencyError("decoding with DALI", "nvidia-dali-cuda130>=2.2", extra="gpu")
    return decoder


def make_loader(name: str, **kwargs: Any) -> Any:
    """An instance of the loader registered as ``name`` in :data:`DECODERS`."""
    module, _, attr = DECODERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(**kwargs)
