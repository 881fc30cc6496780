"""End-to-end embedding throughput from tar shards vs the model's forward pass alone, in one run (CPU).

    python benchmarks/embed.py [--models resnet50,vit_base_patch32_clip_224] [--n 256]
    python benchmarks/embed.py --device cuda --models vit_large_patch14_clip_224 --n 20000 --batch-size 256 --threads 8

End to end = reading the shards, decoding (thread pool, JPEG draft), preprocessing, batching, the forward pass and
normalising, through ``TimmImageEmbedder`` on Dask's synchronous scheduler. Model only = the same model on tensors
that were decoded and preprocessed beforehand and already sit on the device, same batch size, same call (bf16 autocast
on CUDA). Ratio goal: >= 0.9 on the CPU, >= 0.8 on a GPU. Random weights (no hub here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import dask
import torch

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")


def make_input(n: int) -> str:
    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import sample_records

    folder = os.path.join(WORK, f"embed_{n}")
    shutil.rmtree(folder, ignore_errors=True)
    photos = [r for r in sample_records() if r.fields["variant"] == "original"]
    records = (Record(dict(photos[i % len(photos)].members), {"i": i}, "c") for i in range(n))
    write_shards(records, folder, samples_per_shard=max(n // 4, 1), total=n)
    return folder


def bench(model_name: str, folder: str, n: int, batch_size: int, device: str, decoder: str, threads: int):
    from imgcurate import ImageTextPairDataset
    from imgcurate.embedders import TimmImageEmbedder

    ds = ImageTextPairDataset.from_webdataset(folder)
    emb = TimmImageEmbedder(
        model_name, batch_size=batch_size, num_threads_per_worker=threads, device=device, decoder=decoder
    )
    model = emb.model(device)
    size = emb.data_config["input_size"]
    x = torch.randn(batch_size, *size, device=device)
    for _ in range(2):
        emb._forward(model, x, device)  # warm up (autocast, cudnn autotuning)
    start = time.perf_counter()
    done = 0
    while done < n:
        emb._forward(model, x, device)  # the same call the pipeline makes, on tensors already on the device
        done += batch_size
    model_only = done / (time.perf_counter() - start)
    start = time.perf_counter()
    out = emb(ds).metadata.compute()
    end_to_end = len(out) / (time.perf_counter() - start)
    assert out["image_embedding"].notna().all()
    return end_to_end, model_only


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet50,vit_base_patch32_clip_224")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    parser.add_argument("--decoder", default="auto", help="auto, pil, torchvision or dali")
    parser.add_argument("--threads", type=int, default=2, help="decode threads per worker")
    args = parser.parse_args()
    dask.config.set({"scheduler": "sync", "imgcurate.progress": False})
    folder = make_input(args.n)
    print(
        f"torch threads: {torch.get_num_threads()}, images: {args.n} (real photos 200-1411 px), "
        f"batch {args.batch_size}, "
        f"device {args.device}, decoder {args.decoder}"
    )
    for name in args.models.split(","):
        e2e, model_only = bench(name, folder, args.n, args.batch_size, args.device, args.decoder, args.threads)
        print(
            f"{name:<32} end-to-end {e2e:7.1f} img/s  model only {model_only:7.1f} img/s  ratio {e2e / model_only:.2f}"
        )


if __name__ == "__main__":
    main()
