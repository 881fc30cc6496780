"""A step of a user's own, for the tests that load steps by dotted path (``user_steps:CaptionLength``)."""

from __future__ import annotations

import pyarrow as pa

from imgcurate.classifiers.base import ImageClassifier
from imgcurate.steps import ShardStep


class CaptionLength(ShardStep):
    """Adds the caption's length in characters (0 when there is none)."""

    calls: list[int] = []  # shard indices processed, in this process

    def __init__(self, column: str = "caption_chars"):
        self.column = column

    def input_columns(self, id_col: str) -> list[str]:
        return ["caption"]

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.column: pa.int64()}

    def process(self, part, shard, io):
        type(self).calls.append(shard.index)
        return {self.column: part["caption"].str.len().fillna(0).astype("int64").to_numpy()}


class Fails(ShardStep):
    """Fails on every shard: a run that stops part way, after its run directory was started."""

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"never": pa.int64()}

    def process(self, part, shard, io):
        raise RuntimeError(f"shard {shard.index}: this step always fails")


class KillsItsWorker(ShardStep):
    """Ends the worker process that runs it (as the kernel's OOM killer would), on every shard."""

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"never": pa.int64()}

    def process(self, part, shard, io):
        import os

        os._exit(1)


class BrokenBuild(ShardStep):
    """Fails as it is built, with an error of its own kind."""

    def __init__(self):
        raise RuntimeError("the service this step needs is not configured")

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"never": pa.int64()}

    def process(self, part, shard, io):  # pragma: no cover - never built
        return {}


class WrongLength(ShardStep):
    """Returns one value fewer than its shard has rows."""

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"short": pa.int64()}

    def process(self, part, shard, io):
        return {"short": list(range(len(part) - 1))}


class WrongType(ShardStep):
    """Returns text for an integer column."""

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"number": pa.int64()}

    def process(self, part, shard, io):
        return {"number": ["a"] * len(part)}


class SumHead(ImageClassifier):
    """A classifier of a user's own, run fused in an embedder (``classifiers:``): a linear head of ones, the sum of
    the embedding's values."""

    def __init__(self, embedding_size: int = 512, pred_column: str = "emb_sum"):
        super().__init__("image_embedding", pred_column, "float32", 256, embedding_size, "cpu")

    def load_model(self, device):
        import torch

        head = torch.nn.Linear(self.embedding_size, 1, bias=False)
        torch.nn.init.ones_(head.weight)
        return head.to(device).eval()
