"""JPEG draft decoding vs the exact path: decode + timm eval transform speed, and how far the model input moves.

    python benchmarks/draft.py [--model vit_base_patch32_clip_224.openai] [--repeat 3]

Two image sets, both from the sample photos (scikit-image's): the sample's JPEGs as they are (200-1411 px), and the
same photos upscaled to 1600 px on the shorter side and re-encoded (JPEG q90), the size of a typical web photo.
Per set, in one run: images/s of the exact path (full decode, ``convert("RGB")``, timm's transform), of draft
decoding as imgcurate does it (keeping at least ``DRAFT_FACTOR`` x the resize target), and of the old rule (just
above the target), with the worst cosine similarity and mean absolute difference of the model input to the exact path.
One thread.
"""

from __future__ import annotations

import argparse
import io
import time

import timm
import torch
from PIL import Image

from imgcurate.embedders.decode import DRAFT_FACTOR, decode_rgb
from imgcurate.embedders.timm import TimmImageEmbedder
from imgcurate.testing import encode_image, sample_records


def image_sets() -> dict[str, list[bytes]]:
    jpegs = [r.members["jpg"] for r in sample_records() if "jpg" in r.members]
    large = []
    for r in sample_records():
        if r.fields["variant"] == "original":
            image = Image.open(io.BytesIO(next(iter(r.members.values())))).convert("RGB")
            scale = 1600 / min(image.size)
            large.append(encode_image(image.resize((round(image.width * scale), round(image.height * scale))), "jpg"))
    return {"sample JPEGs": jpegs, "upscaled to 1600 px": large}


def old_rule(data: bytes, size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))
    return image.convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch32_clip_224.openai")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    emb = TimmImageEmbedder(args.model, device="cpu")
    transform = timm.data.create_transform(**emb.data_config, is_training=False)
    size = emb.draft_size()
    paths = {
        "exact": lambda d: Image.open(io.BytesIO(d)).convert("RGB"),
        f"draft (>= {DRAFT_FACTOR}x target)": lambda d: decode_rgb(d, size),
        "old draft (>= target)": lambda d: old_rule(d, size),
    }
    print(f"{args.model}: resize target {size} px, draft keeps >= {DRAFT_FACTOR * size} px")
    for label, datas in image_sets().items():
        exact = [transform(paths["exact"](d)) for d in datas]
        print(f"\n{label} ({len(datas)} images)")
        print("| path | images/s | speed vs exact | worst cosine | worst mean abs diff |")
        print("|---|---:|---:|---:|---:|")
        base = None
        for name, decode in paths.items():
            start = time.perf_counter()
            for _ in range(args.repeat):
                got = [transform(decode(d)) for d in datas]
            rate = args.repeat * len(datas) / (time.perf_counter() - start)
            base = base or rate
            cos = min(
                torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()
                for a, b in zip(exact, got, strict=True)
            )
            mad = max((a - b).abs().mean().item() for a, b in zip(exact, got, strict=True))
            print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {cos:.5f} | {mad:.4f} |")


if __name__ == "__main__":
    main()
