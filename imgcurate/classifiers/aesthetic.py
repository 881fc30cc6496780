"""The LAION improved aesthetic predictor: an MLP on CLIP ViT-L/14 image embeddings, scoring roughly 0-10."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgcurate.classifiers.base import ImageClassifier
from imgcurate.classifiers.weights import WeightFile, cached_weights

if TYPE_CHECKING:
    import torch

__all__ = ["AestheticClassifier", "AestheticMLP", "AESTHETIC_WEIGHTS"]

#: The published state dict (``sac+logos+ava1-l14-linearMSE.pth``, 3,714,759 bytes) at a fixed commit of its
#: repository, and its safetensors copy on the Hugging Face hub. The .pth digest is the one that several independent
#: public projects pin for this file; the safetensors copy is checked against the digest of its first download.
AESTHETIC_WEIGHTS = WeightFile(
    "sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
    "6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
AESTHETIC_WEIGHTS_SAFETENSORS = WeightFile(
    "sac-logos-ava1-l14-linearMSE.safetensors",
    "https://huggingface.co/ttj/sac-logos-ava1-l14-linearMSE/resolve/main/model.safetensors",
)


def AestheticMLP(input_size: int = 768) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The predictor's layers, named as in the published file (``layers.0.weight`` ... ``layers.7.bias``).

    Linear 768->1024, Dropout 0.2, Linear 1024->128, Dropout 0.2, Linear 128->64, Dropout 0.1, Linear 64->16,
    Linear 16->1; no activations.
    """
    from torch import nn

    class _MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return _MLP()


class AestheticClassifier(ImageClassifier):
    """LAION's improved aesthetic predictor on L2-normalised CLIP ViT-L/14 embeddings (768-d): a score of about 0-10.

    Args:
        model_path: a local copy of the published ``.pth`` state dict or of its safetensors copy. None downloads the
            ``.pth`` into ``$IMGCURATE_HOME/weights`` once and reuses it offline.
        embedding_column: the column of CLIP ViT-L/14 embeddings.
        pred_column: the output column.
        batch_size: embeddings per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.

    Example:
        >>> emb = TimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", pretrained=True,
        ...                         classifiers=[AestheticClassifier()])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | None = None,
        embedding_column: str = "image_embedding",
        pred_column: str = "aesthetic_score",
        batch_size: int = 4096,
        device: str = "auto",
    ):
        super().__init__(embedding_column, pred_column, "float32", batch_size, 768, device)
        self.model_path = model_path

    def cache_key(self) -> tuple:
        return ("aesthetic", self.model_path)

    def load_model(self, device: str) -> torch.nn.Module:
        from imgcurate.embedders.timm import load_state_dict_file

        path = self.model_path or cached_weights(AESTHETIC_WEIGHTS)
        model = AestheticMLP(self.embedding_size)
        state = load_state_dict_file(str(path))
        state = {k.removeprefix("model."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path}: not the aesthetic predictor's weights ({err})") from None
        return model.eval().to(device)
