"""ClipEmbedder: both towers of an open_clip model in one pass: image embedding, caption embedding and CLIP score.

open_clip's model zoo covers the OpenAI, LAION, DataComp and MetaCLIP checkpoints (``open_clip.list_pretrained()``);
weights come through open_clip's own loaders (the Hugging Face cache, ``HF_HUB_OFFLINE=1`` works once cached) or
from a local checkpoint read without running code from it (safetensors, or torch files with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from imgcurate._dask import Shard
from imgcurate._models import hf_offline, in_hf_cache
from imgcurate.backends import embedding_array, embedding_type, to_pandas
from imgcurate.embedders.base import ImageEmbedder
from imgcurate.errors import MissingWeightsError
from imgcurate.steps.base import Requirement, ShardIO, local_path

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from imgcurate.classifiers.base import ImageClassifier
    from imgcurate.embedders.loaders import ResizeCrop

__all__ = ["ClipEmbedder", "write_random_clip", "TINY_CLIP_CONFIG"]

#: Seed of the random weights of a model built without pretrained weights or a checkpoint.
RANDOM_WEIGHTS_SEED = 0

#: A tiny open_clip model config (32-px ViT, 2-layer text transformer, 64-d embeddings): tests, the notebook and
#: benchmarks run it with seeded random weights, offline.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_random_clip(folder: str | os.PathLike, config: dict | None = None, seed: int = 0) -> str:
    """Writes an open_clip model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) with seeded
    random weights, the layout of open_clip's Hugging Face repositories; load it as ``local-dir:<folder>``.

    Args:
        folder: where to write (created).
        config: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``); default
            :data:`TINY_CLIP_CONFIG`.
        seed: torch seed of the weights.

    Returns:
        The model name to pass to :class:`ClipEmbedder`: ``local-dir:<folder>``.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    cfg = {"model_cfg": dict(config or TINY_CLIP_CONFIG), "preprocess_cfg": {}}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg["model_cfg"])
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "open_clip_model.safetensors")
    )
    return f"local-dir:{folder}"


class _Towers:
    """The loaded model: calling it encodes images (what :class:`ImageEmbedder` runs); ``text`` encodes tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.clip = model
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


class ClipEmbedder(ImageEmbedder):
    """Both towers of an open_clip CLIP model: image embedding, caption embedding and their cosine (CLIP score).

    One pass over each shard decodes and batches the images as every embedder does (same decoders, per-sample error
    rows, device rules, fused classifiers), embeds the captions, and adds ``score_column``: the cosine of the image and
    caption embeddings (null where the image failed or the caption is missing or blank). DataComp's and LAION's
    CLIP-score thresholds are on this raw cosine; ``scale_score=True`` multiplies it by the model's learned logit
    scale (100 for the OpenAI models), the figure CLIP reports as a logit.

    Args:
        model_name: an open_clip architecture (``ViT-B-32``, ``ViT-L-14``, ``ViT-H-14``, ...; ``open_clip.
            list_models()``), ``hf-hub:<repo>`` (config and weights from a Hugging Face repository), or
            ``local-dir:<folder>`` (a folder with ``open_clip_config.json`` and a weights file).
        pretrained: an open_clip pretrained tag for ``model_name`` (``openai``, ``laion2b_s34b_b79k``,
            ``datacomp_xl_s13b_b90k``, ``metaclip_fullcc``; ``open_clip.list_pretrained_tags_by_model(name)``),
            loaded from the Hugging Face cache. None: random weights seeded with :data:`RANDOM_WEIGHTS_SEED`
            (unless ``checkpoint_path`` or a ``local-dir:``/``hf-hub:`` name brings weights).
        checkpoint_path: a local open_clip state dict (safetensors, or a torch file read with ``weights_only=True``).
            With ``pretrained``, the tag still gives the architecture (OpenAI's QuickGELU) and the preprocessing:
            ``pretrained="openai", checkpoint_path=<a copy of OpenAI's weights>`` is the OpenAI model, offline.
        caption_column: the metadata column of captions; None reads each sample's ``.txt`` member from the tar.
        text_embedding_column: the output column of caption embeddings.
        score_column: the output column of CLIP scores (float32).
        scale_score: multiply the cosine by the model's logit scale.
        text_batch_size: captions per text forward pass (default ``batch_size``).
        **kwargs: :class:`ImageEmbedder` options (``image_embedding_column``, ``batch_size``,
            ``num_threads_per_worker``, ``normalize_embeddings``, ``classifiers``, ``device``, ``autocast``,
            ``decoder``, ``use_index_files``, ``exif_transpose``, ``error_column``).

    Raises:
        ValueError: an unknown architecture or pretrained tag (listing the valid ones).
        FileNotFoundError: ``checkpoint_path`` or a ``local-dir:`` folder does not exist.

    Example:
        >>> emb = ClipEmbedder("ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
        >>> ds = emb(ds)  # adds image_embedding, text_embedding, clip_score  # doctest: +SKIP
    """

    requires = (Requirement("open_clip", "open-clip-torch", extra="clip"),)

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        caption_column: str | None = "caption",
        text_embedding_column: str = "text_embedding",
        score_column: str = "clip_score",
        scale_score: bool = False,
        text_batch_size: int | None = None,
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
        super().__init__(
            image_embedding_column=image_embedding_column,
            batch_size=batch_size,
            num_threads_per_worker=num_threads_per_worker,
            normalize_embeddings=normalize_embeddings,
            classifiers=classifiers,
            device=device,
            autocast=autocast,
            error_column=error_column,
            decoder=decoder,
            use_index_files=use_index_files,
            exif_transpose=exif_transpose,
            engine=engine,
            precision=precision,
            model_threads=model_threads,
        )
        if model_name.startswith("local-dir:"):
            model_name = "local-dir:" + local_path(model_name.removeprefix("local-dir:"))
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = local_path(checkpoint_path)
        self.caption_column = caption_column
        self.text_embedding_column = text_embedding_column
        self.score_column = score_column
        self.scale_score = scale_score
        self.text_batch_size = text_batch_size or batch_size or 64
        if checkpoint_path is not None and not os.path.exists(local_path(checkpoint_path)):
            raise FileNotFoundError(f"{checkpoint_path}: checkpoint file not found")
        self._model_cfg, self._preprocess_cfg = _configs(model_name, pretrained)
        self._transform = None

    def cache_key(self) -> tuple:
        return ("open_clip", self.model_name, self.pretrained, self.checkpoint_path, tuple(self.loaded_files().items()))

    # ------------------------------------------------------------------ model
    def load_model(self, device: str) -> _Towers:
        import open_clip
        import torch

        self._check_local_dir()
        tag = self.pretrained if self.checkpoint_path is None else None
        # the tag's architecture even when a local checkpoint brings its weights: OpenAI's were trained with QuickGELU
        named = (open_clip.get_pretrained_cfg(self.model_name, self.pretrained) or {}) if self.pretrained else {}
        quick_gelu = bool(named.get("quick_gelu"))
        try:
            with torch.random.fork_rng(devices=[]):  # random weights: the same model in every worker process
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = open_clip.create_model(
                    self.model_name,
                    pretrained=tag,
                    force_quick_gelu=quick_gelu,
                    pretrained_text=False,  # never download a text tower's base weights behind the user's back
                    weights_only=True,
                )
        except Exception as err:
            if tag is None and not self.model_name.startswith("hf-hub:"):
                raise
            raise MissingWeightsError(_missing_weights(self.model_name, tag, err)) from err
        if self.checkpoint_path is not None:
            _load_checkpoint(model, self.checkpoint_path)
        return _Towers(model.eval().to(device), open_clip.get_tokenizer(self.model_name))

    def check_resources(self) -> None:
        """Offline, a pretrained tag's weights must be in the Hugging Face cache: an error before any work; so must
        the local files it loads (:meth:`Step.check_resources`, and a ``local-dir:`` model's folder)."""
        import open_clip

        super().check_resources()
        self._check_local_dir()
        if self.checkpoint_path is not None and os.path.isfile(self.checkpoint_path):
            _check_weights_file(self.checkpoint_path)

        tag = self.pretrained if self.checkpoint_path is None else None
        if not tag or not hf_offline():
            return
        hub = (open_clip.get_pretrained_cfg(self.model_name, tag) or {}).get("hf_hub")
        names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if hub:
            repo, _, filename = hub.partition("/")[2].partition("/")
            repo = hub.split("/")[0] + "/" + repo
            if not in_hf_cache(repo, [filename] if filename else names):
                raise MissingWeightsError(_missing_weights(self.model_name, tag, None))

    def _check_local_dir(self) -> None:
        """A ``local-dir:`` folder must exist and, unless ``checkpoint_path`` brings the weights, hold a weights file:
        open_clip would otherwise build the model with random weights and only log a line.

        Raises:
            FileError: naming the folder and what it lacks.
        """
        if not self.model_name.startswith("local-dir:"):
            return
        from imgcurate.errors import FileError

        folder = self.model_name.removeprefix("local-dir:")
        if not os.path.isdir(folder):
            raise FileError(folder, "no such folder (ClipEmbedder's local-dir: model)")
        if self.checkpoint_path is not None:
            return
        weights = _local_dir_weights(folder)
        if weights is None:
            raise FileError(
                folder,
                "holds no weights file (*.safetensors, *.bin or *.pth beside open_clip_config.json): open_clip would "
                "build the model with random weights; put the weights there or pass checkpoint_path=",
            )
        _check_weights_file(weights)

    def embedding_dim(self) -> int:
        """The embedding's length, from the model config (no weights are loaded)."""
        return int(self._model_cfg["embed_dim"])

    # ------------------------------------------------------------------ preprocessing
    def transform(self):
        """open_clip's eval transform for the model (PIL image -> normalised tensor)."""
        if self._transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**self._preprocess_cfg), is_train=False)
        return self._transform

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform()(image)

    def tensor_preprocessing(self) -> ResizeCrop | None:
        """open_clip's eval transform (resize the shorter side, centre crop) for the GPU decoders; None for its
        other resize modes."""
        from imgcurate.embedders.loaders import ResizeCrop

        cfg = self._preprocess_cfg
        size = cfg["size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if cfg.get("resize_mode", "shortest") != "shortest" or height != width:
            return None
        interpolation = cfg.get("interpolation", "bicubic")
        return ResizeCrop(
            shorter=height,
            crop=(height, width),
            interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )

    # ------------------------------------------------------------------ captions
    def captions(self, part: Any, shard: Shard, io: ShardIO) -> list[str | None]:
        """The partition's captions, in row order: the caption column, or each sample's ``.txt`` member. A caption of
        white space only is no caption (a null text embedding and CLIP score, not the score of an empty prompt)."""
        if self.caption_column is not None:
            values = to_pandas(part[[self.caption_column]])[self.caption_column]
            return [v if isinstance(v, str) and v.strip() else None for v in values.tolist()]
        from imgcurate.io.tar import aligned_samples

        keys = to_pandas(part[[io.id_col]])[io.id_col].tolist()
        out: list[str | None] = []
        for sample in aligned_samples(shard.tar, keys, io.storage_options, exts={"txt"}):
            data = None if sample is None else sample.members.get("txt")
            text = None if data is None else data.decode("utf-8", errors="replace")
            out.append(text if text and text.strip() else None)
        return out

    def embed_texts(self, texts: Sequence[str | None], device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(valid, matrix)``: caption embeddings, one row per text (zeros where the text is None)."""
        from imgcurate._models import resolve_device

        device = device or resolve_device(self.device)
        towers = self.model(device)
        valid = np.array([t is not None for t in texts], dtype=bool)
        matrix = np.zeros((len(texts), self.embedding_dim()), dtype=np.float32)
        rows = np.flatnonzero(valid)
        for start in range(0, len(rows), self.text_batch_size):
            chunk = rows[start : start + self.text_batch_size]
            tokens = towers.tokenizer([texts[i] for i in chunk])
            matrix[chunk] = self._forward(towers.text, tokens, device)
        return valid, matrix

    # ------------------------------------------------------------------ the step contract
    def input_columns(self, id_col: str) -> list[str]:
        return [self.caption_column] if self.caption_column is not None else []

    def output_columns(self) -> dict[str, pa.DataType]:
        types = super().output_columns()
        types[self.text_embedding_column] = embedding_type(self.embedding_dim())
        types[self.score_column] = pa.float32()
        return types

    def extra_columns(self, part: Any, shard: Shard, io: ShardIO, valid: np.ndarray, matrix: np.ndarray) -> dict:
        from imgcurate._models import resolve_device

        device = resolve_device(self.device)
        text_valid, text = self.embed_texts(self.captions(part, shard, io), device)
        both = valid & text_valid
        score = np.full(len(valid), np.nan, dtype=np.float32)
        a, b = matrix[both], text[both]
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        score[both] = cosine * (self.model(device).logit_scale if self.scale_score else 1.0)
        return {self.text_embedding_column: embedding_array(text, text_valid), self.score_column: score}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_transform"] = None  # rebuilt where it runs
        return state

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.model_name!r}, pretrained={self.pretrained!r})"


def _configs(model_name: str, pretrained: str | None) -> tuple[dict, dict]:
    """(model config, preprocessing config) of a model, read without loading any weights."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    schema, _, rest = model_name.partition(":") if model_name.startswith(("hf-hub:", "local-dir:")) else ("", "", "")
    if schema == "local-dir":
        path = os.path.join(rest, "open_clip_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_name}: no open_clip_config.json in {rest}")
        config = _read_config(path)
    elif schema == "hf-hub":
        from huggingface_hub import hf_hub_download

        try:
            with open(hf_hub_download(rest, "open_clip_config.json")) as f:
                config = json.load(f)
        except Exception as err:
            raise MissingWeightsError(_missing_weights(model_name, None, err)) from err
    else:
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            close = [m for m in open_clip.list_models() if model_name.split("-")[0].lower() in m.lower()][:10]
            raise ValueError(
                f"unknown open_clip model {model_name!r}" + (f"; similar: {', '.join(close)}" if close else "")
            )
        tag_cfg = {}
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise ValueError(
                    f"unknown pretrained tag {pretrained!r} for {model_name}: "
                    f"choose one of {', '.join(tags) or '(none)'}"
                )
        config = {"model_cfg": model_cfg, "preprocess_cfg": tag_cfg}
    model_cfg = config.get("model_cfg", config)
    if schema == "local-dir" and not (isinstance(model_cfg, dict) and isinstance(model_cfg.get("embed_dim"), int)):
        from imgcurate.errors import FileError

        raise FileError(os.path.join(rest, "open_clip_config.json"), "not an open_clip model config (no embed_dim)")
    preprocess = merge_preprocess_dict(PreprocessCfg(), config.get("preprocess_cfg") or {})
    image_size = model_cfg.get("vision_cfg", {}).get("image_size")
    if image_size is not None:
        preprocess["size"] = image_size
    return model_cfg, preprocess


def _read_config(path: str) -> dict:
    """An ``open_clip_config.json``, or FileError naming it when it is not a JSON object."""
    from imgcurate.errors import FileError

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileError(path, f"not valid JSON ({type(err).__name__} at character {getattr(err, 'pos', 0)})") from None
    if not isinstance(config, dict):
        raise FileError(path, "not an open_clip model config (not a JSON object)")
    return config


def _local_dir_weights(folder: str) -> str | None:
    """The weights file open_clip loads from a ``local-dir:`` folder (its own choice among the files), or None."""
    from pathlib import Path

    from open_clip.factory import _find_checkpoint_in_dir

    return _find_checkpoint_in_dir(Path(folder))


def _check_weights_file(path: str) -> None:
    """Reads a weights file's header (a damaged file is an error before any work), and refuses a safetensors file
    under another suffix, which open_clip would hand to ``torch.load``.

    Raises:
        WeightFileError: naming the file and the problem.
    """
    from imgcurate.embedders.state_dict import state_dict_shapes, weight_format
    from imgcurate.errors import WeightFileError

    if weight_format(path) == "safetensors" and not path.endswith(".safetensors"):
        raise WeightFileError(
            path, "a safetensors file without the .safetensors suffix, which open_clip needs to read it"
        )
    state_dict_shapes(path)


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    from open_clip.factory import load_checkpoint

    from imgcurate.errors import WeightFileError

    _check_weights_file(path)
    try:
        load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as err:  # open_clip's own errors name no file
        # torch's message: a header line, then the missing, unexpected and mis-shaped tensors, one line each
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = "; ".join(lines[:1] + [line[:200] for line in lines[1:4]])
        raise WeightFileError(
            path, f"not a checkpoint of this open_clip model ({type(err).__name__}: {first})"
        ) from None


def _missing_weights(model_name: str, tag: str | None, err: Exception | None) -> str:
    offline = hf_offline()
    problem = "are not available offline" if err is None else f"could not be loaded ({type(err).__name__}: {err})"
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    call = f"open_clip.create_model('{model_name}'" + (f", pretrained='{tag}')" if tag else ")")
    return (
        f"open_clip weights for {model_name!r}" + (f" (pretrained={tag!r})" if tag else "") + f" {problem}. "
        f"{'HF_HUB_OFFLINE is set and ' if offline else ''}they are not in the Hugging "
        f'Face cache ({cache}). Provide them by running `python -c "import open_clip; {call}"` on a machine with '
        "network access and copying that cache folder here (or setting HF_HOME to it), or pass checkpoint_path= with "
        "a local open_clip safetensors/torch state dict, or model_name='local-dir:<folder>' with open_clip_config.json "
        "and the weights file."
    )
