"""LAION's CLIP-based NSFW detector for ViT-L/14 embeddings (the PyTorch conversion of its Keras model)."""

from __future__ import annotations

import zipfile
from typing import TYPE_CHECKING

from imgcurate.classifiers.base import ImageClassifier
from imgcurate.classifiers.weights import WeightFile, cached_weights

if TYPE_CHECKING:
    import torch

__all__ = ["NsfwClassifier", "NsfwMLP", "NSFW_WEIGHTS"]

#: The published PyTorch conversion: a zip holding ``clip_autokeras_binary_nsfw.pth``. No digest is published for it;
#: the digest of the first download is recorded in the cache and checked on every later use.
NSFW_WEIGHTS = WeightFile(
    "clip_autokeras_binary_nsfw.zip",
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip",
)


def NsfwMLP(input_size: int = 768) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The detector's layers, named as in the published conversion.

    ``norm`` (buffers ``mean`` and ``variance``: ``(x - mean) / sqrt(variance)``), then ``linear_1`` 768->64, ReLU,
    ``linear_2`` 64->512, ReLU, ``linear_3`` 512->256, ReLU, ``linear_4`` 256->1, sigmoid.
    """
    import torch
    from torch import nn

    class _Normalization(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(input_size))
            self.register_buffer("variance", torch.ones(input_size))

        def forward(self, x):
            return (x - self.mean) / self.variance.sqrt()

    class _MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = _Normalization()
            self.linear_1 = nn.Linear(input_size, 64)
            self.linear_2 = nn.Linear(64, 512)
            self.linear_3 = nn.Linear(512, 256)
            self.linear_4 = nn.Linear(256, 1)

        def forward(self, x):
            x = torch.relu(self.linear_1(self.norm(x)))
            x = torch.relu(self.linear_2(x))
            x = torch.relu(self.linear_3(x))
            return torch.sigmoid(self.linear_4(x))

    return _MLP()


class NsfwClassifier(ImageClassifier):
    """LAION's CLIP-based NSFW detector on CLIP ViT-L/14 embeddings (768-d): a probability 0-1 (1 = unsafe).

    Args:
        model_path: a local ``.pth``/``.safetensors`` state dict, or the published zip. None downloads the zip into
            ``$IMGCURATE_HOME/weights`` once and reuses it offline.
        embedding_column: the column of CLIP ViT-L/14 embeddings.
        pred_column: the output column.
        batch_size: embeddings per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        model_path: str | None = None,
        embedding_column: str = "image_embedding",
        pred_column: str = "nsfw_score",
        batch_size: int = 4096,
        device: str = "auto",
    ):
        super().__init__(embedding_column, pred_column, "float32", batch_size, 768, device)
        self.model_path = model_path

    def cache_key(self) -> tuple:
        return ("nsfw", self.model_path)

    def load_model(self, device: str) -> torch.nn.Module:
        from imgcurate.embedders.timm import load_state_dict_file

        path = str(self.model_path or cached_weights(NSFW_WEIGHTS))
        if path.endswith(".zip"):
            path = _extract_pth(path)
        model = NsfwMLP(self.embedding_size)
        try:
            model.load_state_dict(load_state_dict_file(path))
        except RuntimeError as err:
            raise ValueError(f"{path}: not the NSFW detector's weights ({err})") from None
        return model.eval().to(device)


def _extract_pth(zip_path: str) -> str:
    """Extracts the ``.pth`` of the published zip beside it (once) and returns its path."""
    import pathlib

    target = pathlib.Path(zip_path).with_suffix(".pth")
    if not target.exists():
        with zipfile.ZipFile(zip_path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".pth")]
            if not names:
                raise ValueError(f"{zip_path}: holds no .pth file ({', '.join(archive.namelist()[:5])})")
            tmp = target.with_suffix(".pth.tmp")
            tmp.write_bytes(archive.read(names[0]))
            tmp.replace(target)
    return str(target)
