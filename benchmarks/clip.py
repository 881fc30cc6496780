"""CLIP two-tower throughput: ClipEmbedder end to end from tar shards (image + caption + score) vs the model's own
forward on pre-decoded, pre-processed image tensors and pre-tokenised captions, in one run (CPU, random weights).

    python benchmarks/clip.py [--model ViT-B-32] [--n 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import time

import dask
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from embed import make_input
    from PIL import Image

    from imgcurate import ImageTextPairDataset
    from imgcurate.embedders.clip import ClipEmbedder
    from imgcurate.io import iter_samples

    folder = make_input(args.n)
    ds = ImageTextPairDataset.from_webdataset(folder)
    emb = ClipEmbedder(args.model, batch_size=args.batch_size, num_threads_per_worker=args.threads, device="cpu")
    towers = emb.model("cpu")
    captions = [f"a photo number {i} of something on a table" for i in range(args.n)]
    ds = ds.with_metadata(ds.metadata.assign(caption=ds.metadata["i"].astype(str) + " a photo of something on a table"))
    with dask.config.set(scheduler="synchronous"):
        emb(ds).metadata.compute()  # warm-up
        start = time.perf_counter()
        emb(ds).metadata.compute()
        end_to_end = args.n / (time.perf_counter() - start)
    images = [s.image for tar in ds.tar_files for s in iter_samples(tar)]
    x = torch.stack([emb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    tokens = towers.tokenizer(captions)
    start = time.perf_counter()
    for i in range(0, args.n, args.batch_size):
        emb._forward(towers, x[i : i + args.batch_size], "cpu")
        emb._forward(towers.text, tokens[i : i + args.batch_size], "cpu")
    model_only = args.n / (time.perf_counter() - start)
    print(
        f"{args.model} n={args.n} batch={args.batch_size} threads={torch.get_num_threads()}: end to end "
        f"{end_to_end:.1f} pairs/s, model only {model_only:.1f} pairs/s, ratio {end_to_end / model_only:.2f}"
    )


if __name__ == "__main__":
    main()
