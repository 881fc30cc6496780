"""TimmImageEmbedder: any timm model as an embedder, CLIP image towers included."""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgcurate._models import hf_offline, in_hf_cache
from imgcurate.embedders.base import ImageEmbedder
from imgcurate.errors import MissingWeightsError
from imgcurate.steps.base import local_path

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from imgcurate.classifiers.base import ImageClassifier
    from imgcurate.embedders.loaders import ResizeCrop

__all__ = ["TimmImageEmbedder", "load_state_dict_file"]

#: ``pretrained=IF_AVAILABLE``: the published weights when they can be loaded (from the cache, or downloaded where the
#: run starts), else seeded random ones, with a warning; settled once per run (:meth:`TimmImageEmbedder.check`).
IF_AVAILABLE = "if-available"
_RANDOM_WEIGHTS = ("no pretrained weights for {} could be loaded ({}): using seeded random weights, which find copies "
                   "but say nothing about content")  # fmt: skip

#: Seed of the random weights of a model built without pretrained weights or a checkpoint.
RANDOM_WEIGHTS_SEED = 0

_OUTPUTS = ("auto", "head", "pre_logits")


def load_state_dict_file(path: str) -> dict[str, Any]:
    """Reads a state dict from safetensors or a torch file, never running code from it (``weights_only=True``); the
    format is told by the file's first bytes (:func:`imgcurate.embedders.state_dict.read_state_dict`).

    A checkpoint that wraps its weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, and a
    ``module.`` prefix (DataParallel) is removed.

    Raises:
        WeightFileError: the file is damaged or not a state dict, naming it.
    """
    from imgcurate.embedders.state_dict import read_state_dict

    return read_state_dict(str(path))


class TimmImageEmbedder(ImageEmbedder):
    """Embeds images with any timm model (``timm.list_models()``), CLIP image towers included.

    For CLIP towers (``vit_large_patch14_clip_quickgelu_224.openai``, ``vit_base_patch32_clip_224.openai``, ...) the
    embedding is the projected CLIP embedding, timm's default head for those models (768-d for L/14, 512-d for B/32),
    which the LAION heads expect. For other models it is the pooled pre-logits features. ``output`` overrides it.

    Preprocessing is timm's own resolved data config for the model (resize, interpolation, crop, mean/std), so the
    embedding of an image equals ``model(timm_transform(image))``.

    Args:
        model_name: a timm model name.
        pretrained: load timm's published weights through the Hugging Face cache (works offline once cached).
            ``"if-available"`` uses them when they can be loaded and otherwise seeded random weights, saying so in
            one warning (what the bundled sample pipeline does, so that it runs on a machine without them).
            Without them (and without ``checkpoint_path``) the weights are random but seeded, so every Dask worker
            process builds the same model and embeddings stay comparable across shards.
        checkpoint_path: a local safetensors or torch state dict instead; it may hold the classifier head or not.
        output: ``auto``, ``head`` (the model's output) or ``pre_logits`` (pooled features before the head).
        model_kwargs: extra keyword arguments of ``timm.create_model`` (``img_size``, ``num_classes``, ...).
        use_jpeg_draft: decode large JPEGs at reduced scale (1/2 to 1/8), keeping at least twice the resize target;
            2.6x faster on 1600-px photos, with the model input within cosine similarity 0.999 of a full decode.
        exif_transpose: apply EXIF orientation on every decoder (default off, as timm's own loader).
        use_index_files: with the DALI decoder, read each shard through its ``.idx`` index file (DALI's
            ``wds2idx`` makes them); without, DALI scans the tar first.
        decoder: ``auto`` (``cpu`` on the CPU; on CUDA DALI when installed, else torchvision's GPU JPEG decoder),
            ``pil`` (timm's exact path), ``cpu`` (the fastest decoder with PIL's pixels per image, torch's port of
            Pillow's resize: model input within cosine 0.99999 of ``pil``), ``torchvision`` or ``dali``. The GPU
            decoders keep timm's sizes and crop window but resample
            with their own kernels: their model input differs from the PIL path (which matches timm exactly) by a
            mean absolute 1e-3 or so on the sample photos.
        engine: CPU inference engine: ``auto`` (the fastest of torch and OpenVINO on this machine whose embeddings
            match torch fp32), ``torch`` (channels-last for convolutional models) or ``openvino``.
        precision: ``auto``, ``fp32`` or ``bf16`` (CPU only; ``auto`` tries bf16 where the CPU has it natively).
        **kwargs: :class:`ImageEmbedder` options (batch_size, num_threads_per_worker, normalize_embeddings,
            classifiers, device, autocast, image_embedding_column, model_threads).

    Example:
        >>> emb = TimmImageEmbedder("vit_base_patch32_clip_224.openai", pretrained=True, batch_size=256)
        >>> ds = emb(ds)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str = False,
        batch_size: int | None = None,
        num_threads_per_worker: int = 4,
        image_embedding_column: str = "image_embedding",
        normalize_embeddings: bool = True,
        classifiers: Sequence[ImageClassifier] = (),
        autocast: bool = True,
        use_index_files: bool = False,
        device: str = "auto",
        checkpoint_path: str | None = None,
        output: str = "auto",
        use_jpeg_draft: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        decoder: str = "auto",
        exif_transpose: bool = False,
        engine: str = "auto",
        precision: str = "auto",
        model_threads: int | None = None,
    ):
        import timm

        if isinstance(pretrained, str) and pretrained != IF_AVAILABLE:
            raise ValueError(f"pretrained must be true, false or {IF_AVAILABLE!r}, got {pretrained!r}")
        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:10]
            raise ValueError(f"unknown timm model {model_name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        arch, tag = timm.models.split_model_name_tag(model_name)
        known = timm.list_models(f"{arch}.*", include_tags=True)  # every tag timm builds (``.untrained`` included)
        if tag and model_name not in known:
            tags = [n.partition(".")[2] for n in known]
            raise ValueError(
                f"unknown pretrained tag {tag!r} for timm model {arch!r}: choose one of {', '.join(tags) or '(none)'}"
            )
        if (model_kwargs or {}).get("in_chans", 3) != 3:
            raise ValueError(
                f"model_kwargs in_chans={model_kwargs['in_chans']!r}: the decoders give the model RGB images "
                "(3 channels)"
            )
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(_OUTPUTS)}, got {output!r}")
        if checkpoint_path is not None and not os.path.exists(local_path(checkpoint_path)):
            raise FileNotFoundError(f"{checkpoint_path}: checkpoint file not found")
        super().__init__(
            image_embedding_column=image_embedding_column,
            batch_size=batch_size,
            num_threads_per_worker=num_threads_per_worker,
            normalize_embeddings=normalize_embeddings,
            classifiers=classifiers,
            device=device,
            autocast=autocast,
            decoder=decoder,
            use_index_files=use_index_files,
            exif_transpose=exif_transpose,
            engine=engine,
            precision=precision,
            model_threads=model_threads,
        )
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = local_path(checkpoint_path)
        self.output = _auto_output(model_name) if output == "auto" else output
        self.use_jpeg_draft = use_jpeg_draft
        self.model_kwargs = dict(model_kwargs or {})
        self._transform = None
        self._data_config: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """As :meth:`Step.describe`; with ``pretrained="if-available"`` also whether the weights are there now, since
        that decides between pretrained and seeded random weights."""
        out = super().describe()
        cached = self._if_available_cached()
        if cached is not None:
            out["pretrained_weights_cached"] = cached
        return out

    def _if_available_cached(self) -> bool | None:
        """With ``pretrained="if-available"``, whether the weights are used: as settled by :meth:`check` where the run
        started (the step travels to the workers with it), else whether they are cached now; None otherwise."""
        if self.pretrained == IF_AVAILABLE and self.checkpoint_path is None:
            settled = self._settled()
            return pretrained_weights_cached(self.model_name) if settled is None else settled
        return None

    def check(self, meta: Any, id_col: str) -> None:
        """As :meth:`Step.check`; with ``pretrained="if-available"`` also settles here, where the run starts, whether
        the pretrained weights are used. Every worker then builds that model: a worker whose cache differs does not
        embed its shards with other weights (it is an error where it lacks weights settled as used)."""
        super().check(meta, id_col)
        self.__dict__.pop("_weights_cached", None)
        cached = self._if_available_cached()
        if cached is not None:
            self.__dict__["_weights_cached"] = cached

    def prepare(self) -> None:
        """Online, ``pretrained="if-available"`` weights that :meth:`check` found missing are downloaded here, once,
        into the cache the workers read, and then settled as used. The commands that only check a config
        (``config``, ``estimate``, ``doctor``) download nothing."""
        if self._settled() is False and self.checkpoint_path is None and not hf_offline():
            self.__dict__["_weights_cached"] = fetch_pretrained_weights(self.model_name)

    def _settled(self) -> bool | None:
        """What :meth:`check` settled for ``pretrained="if-available"`` (None otherwise, or before a check)."""
        return self.__dict__.get("_weights_cached") if self.pretrained == IF_AVAILABLE else None

    def cache_key(self) -> tuple:
        # the weights' content and, for "if-available", whether they are cached: a worker that loaded other weights
        # (rewritten at the same path, or random before the download) does not reuse that model
        weights = (tuple(self.loaded_files().items()), self._if_available_cached())
        return ("timm", self.model_name, self.pretrained, self.checkpoint_path, self.output, repr(self.model_kwargs),
                weights)  # fmt: skip

    # ------------------------------------------------------------------ model
    def _kwargs(self) -> dict[str, Any]:
        """``timm.create_model``'s keyword arguments: ``model_kwargs`` and, for ``output="head"`` with a checkpoint
        whose classifier head has another number of outputs (a fine-tuned model), that number as ``num_classes``, so
        that the embedding follows the file."""
        if self.checkpoint_path is None or self.output != "head" or "num_classes" in self.model_kwargs:
            return self.model_kwargs
        if "_checkpoint_classes" not in self.__dict__:
            import timm
            import torch

            from imgcurate.embedders.state_dict import state_dict_shapes

            shapes = state_dict_shapes(self.checkpoint_path)
            with torch.device("meta"):
                model = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
            weight = next((k for k in _head_names(model) if k.endswith("weight")), None)
            found = shapes.get(weight) if weight is not None else None
            self.__dict__["_checkpoint_classes"] = int(found[0]) if found else None
        classes = self.__dict__["_checkpoint_classes"]
        return self.model_kwargs if classes is None else {**self.model_kwargs, "num_classes": classes}

    def _create(self) -> torch.nn.Module:
        import timm
        import torch

        settled = self._settled()
        if settled is False and self.checkpoint_path is None:
            warnings.warn(_RANDOM_WEIGHTS.format(self.model_name, "not in the Hugging Face cache where the run "
                                                 "started"), stacklevel=2)  # fmt: skip
        try:
            pretrained = self.pretrained and self.checkpoint_path is None and settled is not False
            with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
                torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights: the same model in every worker process
                model = timm.create_model(self.model_name, pretrained=pretrained, **self._kwargs())
        except Exception as err:
            if not self.pretrained or not pretrained:
                raise
            if self.pretrained == IF_AVAILABLE and settled is not True:
                warnings.warn(_RANDOM_WEIGHTS.format(self.model_name, "not in the Hugging Face cache, no network"),
                              stacklevel=2)  # fmt: skip
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_WEIGHTS_SEED)
                    return timm.create_model(self.model_name, pretrained=False, **self.model_kwargs).eval()
            problem = f"could not be loaded ({type(err).__name__}: {err})"
            raise MissingWeightsError(self._missing_weights(problem)) from err
        if self.checkpoint_path is not None:
            self._load_checkpoint(model)
        return model.eval()

    def _missing_weights(self, what: str) -> str:
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        return (
            f"pretrained weights for {self.model_name!r} {what}. {'HF_HUB_OFFLINE is set and ' if hf_offline() else ''}"
            f'they are not in the Hugging Face cache ({cache}). Provide them by running `python -c "import timm; '
            f"timm.create_model('{self.model_name}', pretrained=True)\"` on a machine with network access and copying "
            "that cache folder here (or setting HF_HOME to it), or pass checkpoint_path= with a local "
            "safetensors/torch state dict."
        )

    def check_resources(self) -> None:
        """Offline, the pretrained weights must be in the caches: a missing download is an error before any work,
        not at the first shard; so must the local files it loads (:meth:`Step.check_resources`, checked after the
        model's own weights, as are its fused classifiers')."""
        wanted = self.pretrained is True and self.checkpoint_path is None
        if wanted and hf_offline() and pretrained_weights_cached(self.model_name) is False:
            raise MissingWeightsError(self._missing_weights("are not available offline"))
        settled = self._settled()
        missing = hf_offline() and pretrained_weights_cached(self.model_name) is False  # online, it downloads them
        if settled and self.checkpoint_path is None and missing:
            raise MissingWeightsError(self._missing_weights(
                "are not here, though they were in the cache where the run started (pretrained='if-available' "
                "uses them on every worker or on none)"
            ))  # fmt: skip
        if self.checkpoint_path is not None and os.path.isfile(self.checkpoint_path):
            import timm
            import torch

            from imgcurate.embedders.state_dict import state_dict_shapes

            shapes = state_dict_shapes(self.checkpoint_path)  # a damaged file is an error here, before any work
            with torch.device("meta"):
                model = timm.create_model(self.model_name, pretrained=False, **self._kwargs())
            self._check_checkpoint(model, shapes)
        super().check_resources()

    def _check_checkpoint(self, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """Compares the checkpoint's tensors with the model's; returns the head's names that are not to be loaded
        (the classifier head, unused for ``pre_logits``, when its shapes differ: a fine-tuned model's head).

        Raises:
            WeightFileError: naming the file and the tensors missing, stray or of other shapes.
        """
        from imgcurate.errors import WeightFileError

        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        head = _head_names(model) if self.output != "head" else set()
        # BatchNorm's step counters are often left out of a checkpoint: torch keeps the model's own
        missing = [k for k in expected if k not in shapes and k not in head and not k.endswith("num_batches_tracked")]
        if missing:
            raise WeightFileError(
                self.checkpoint_path,
                f"missing weights for {self.model_name}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else ""),
            )
        stray = [k for k in shapes if k not in expected and not _is_head_key(k)]
        if stray:
            raise WeightFileError(
                self.checkpoint_path, f"weights that {self.model_name} does not have: {', '.join(stray[:5])}"
            )
        wrong = [k for k in expected if k in shapes and shapes[k] != expected[k] and k not in head]
        if wrong:
            listed = ", ".join(f"{k} {list(shapes[k])} (the model's: {list(expected[k])})" for k in wrong[:3])
            hint = " (model_kwargs such as num_classes or img_size must be those it was trained with)"
            raise WeightFileError(
                self.checkpoint_path, f"weights of other shapes than {self.model_name}'s: {listed}" + hint
            )
        return {k for k in head if k in shapes and shapes[k] != expected[k]}

    def _load_checkpoint(self, model: torch.nn.Module) -> None:
        state = load_state_dict_file(self.checkpoint_path)
        skip = self._check_checkpoint(model, {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
        model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)

    def load_model(self, device: str) -> torch.nn.Module:
        model = self._create().to(device)
        if self.output == "head":
            return model
        return _pre_logits_module()(model)

    # ------------------------------------------------------------------ preprocessing
    @property
    def data_config(self) -> dict[str, Any]:
        """timm's resolved data config for the model (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        if self._data_config is None:
            self._shape_probe()
        return self._data_config

    def embedding_dim(self) -> int:
        """The embedding's length, from the model's architecture alone (no weights are loaded or allocated)."""
        if self.__dict__.get("_embedding_dim") is None:
            self._shape_probe()
        return self.__dict__["_embedding_dim"]

    def _shape_probe(self) -> None:
        """Builds the model on torch's ``meta`` device (shapes only, no memory, no weights) to read its data config
        and its output size."""
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(self.model_name, pretrained=False, **self._kwargs()).eval()
            self._data_config = timm.data.resolve_model_data_config(model, args=_size_args(self.model_kwargs))
            x = torch.empty(1, *self._data_config["input_size"])
            out = model(x) if self.output == "head" else model.forward_head(model.forward_features(x), pre_logits=True)
        self.__dict__["_embedding_dim"] = int(out.shape[-1])

    def transform(self):
        """timm's eval transform for the model (PIL image -> normalised tensor)."""
        if self._transform is None:
            import timm

            self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        return self._transform

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform()(image)

    def tensor_preprocessing(self) -> ResizeCrop | None:
        """timm's eval transform as a :class:`ResizeCrop` (None for crop modes other than ``center``)."""
        from imgcurate.embedders.loaders import ResizeCrop

        cfg = self.data_config
        height, width = cfg["input_size"][-2:]
        crop_pct = cfg.get("crop_pct") or 0.875
        if cfg.get("crop_mode", "center") not in (None, "center") or height != width:
            return None
        interpolation = cfg.get("interpolation", "bilinear")
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            interpolation = "bilinear"  # timm maps 'random' and the like to bilinear at eval
        return ResizeCrop(
            shorter=math.floor(height / crop_pct),
            crop=(height, width),
            interpolation=interpolation,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )

    def draft_size(self) -> int | None:
        if not self.use_jpeg_draft:
            return None
        size = self.data_config["input_size"][-1]
        return int(size / self.data_config.get("crop_pct", 1.0)) + 1

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_transform"] = None  # rebuilt where it runs
        return state

    def __repr__(self) -> str:
        return f"TimmImageEmbedder({self.model_name!r}, pretrained={self.pretrained}, output={self.output!r})"


def _auto_output(model_name: str) -> str:
    """``head`` for CLIP image towers (their head is the CLIP projection), ``pre_logits`` for everything else.

    A CLIP tower fine-tuned on ImageNet (``..._clip_224.laion2b_ft_in12k_in1k``, which timm also picks for an
    untagged ``vit_base_patch32_clip_224``) has a classifier head instead, so it gets ``pre_logits``.
    """
    import timm.models

    if "clip" not in model_name:
        return "pre_logits"
    cfg = timm.models.get_pretrained_cfg(model_name)
    tag = (cfg.tag if cfg is not None else None) or ""
    return "pre_logits" if "_ft_" in f"_{tag}_" else "head"


def _head_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of a timm model's classifier head (parameters and buffers)."""
    if not hasattr(model, "get_classifier"):
        return set()
    classifier = model.get_classifier()
    if not hasattr(classifier, "state_dict"):
        return set()
    ids = {id(v) for v in classifier.state_dict(keep_vars=True).values()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def _is_head_key(key: str) -> bool:
    return key.split(".")[0] in ("head", "fc", "classifier", "last_linear")


@functools.cache
def _pre_logits_module() -> type:
    """The module class of a timm model's pooled pre-logits features (made on first use: torch is imported late)."""
    import torch

    class PreLogits(torch.nn.Module):
        """A timm model's pooled features before its head, as a module (so that engines can convert it)."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    return PreLogits


def fetch_pretrained_weights(model_name: str) -> bool:
    """Downloads ``model_name``'s pretrained weights into the cache timm reads them from (the Hugging Face cache, or
    torch hub's checkpoints for a URL), as far as the network allows; whether they are cached afterwards."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - an unknown name: timm's own error comes when the model is created
        return False
    if cfg is None:
        return False
    try:
        if cfg.hf_hub_id:
            from huggingface_hub import hf_hub_download

            for name in hub_weight_names(cfg.hf_hub_filename):
                try:
                    hf_hub_download(cfg.hf_hub_id, name)
                    break
                except Exception:  # noqa: BLE001 - not in the repository (try the next name), or no network
                    continue
        elif cfg.url:
            from timm.models._hub import download_cached_file

            download_cached_file(cfg.url)
    except Exception:  # noqa: BLE001 - no network, or the source refused: the weights are not here
        return False
    return bool(pretrained_weights_cached(model_name))


def _size_args(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's data config arguments for a model built with ``img_size=`` (an int or (height, width)): the
    preprocessing must give images of the size the model was built for, not its pretrained config's size."""
    size = model_kwargs.get("img_size")
    if size is None:
        return {}
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return {"input_size": (3, int(height), int(width))}


def hub_weight_names(filename: str | None) -> list[str]:
    """The files of a Hugging Face repository that timm loads a model's weights from, in the order it tries them:
    the pretrained config's ``hf_hub_filename`` (else ``pytorch_model.bin``), its safetensors alternative first
    (``model.safetensors``; ``open_clip_model.safetensors`` for ``open_clip_pytorch_model.bin``; ``x.safetensors``
    for another ``x.bin``). Only these: another file of the repository (an open_clip checkpoint beside timm's) is
    not read by timm, so it does not make the weights available."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    alternative = safe.get(filename) or (filename.removesuffix(".bin") + ".safetensors" if filename.endswith(".bin")
                                         else None)  # fmt: skip
    return [alternative, filename] if alternative else [filename]


def pretrained_weights_cached(model_name: str) -> bool | None:
    """Whether timm would find ``model_name``'s pretrained weights without a download: in the Hugging Face cache for
    a hub model (the file names timm tries, safetensors first), in torch hub's checkpoint folder for a URL. None when
    the model has no pretrained source this can check (timm itself will say what is wrong)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:  # an unknown name: timm's own error comes when the model is created
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return in_hf_cache(cfg.hf_hub_id, hub_weight_names(cfg.hf_hub_filename))
    if cfg.url:
        import torch.hub

        return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url)))
    if cfg.file:
        return os.path.exists(cfg.file)
    return None
