"""Embedders: ImageEmbedder (base) and TimmImageEmbedder (any timm model, CLIP included)."""

from imgcurate.embedders.base import ImageEmbedder
from imgcurate.embedders.timm import TimmImageEmbedder, load_state_dict_file

__all__ = ["ImageEmbedder", "TimmImageEmbedder", "load_state_dict_file"]
