"""The CPU decoders per format and size: decode alone, and decode + preprocessing as the loaders do it, in one run.

    python benchmarks/decode.py [--model efficientnet_lite0] [--rounds 7]

Images: scikit-image's real colour photos (astronaut, chelsea, coffee, rocket, retina, hubble_deep_field,
immunohistochemistry), resized to a shorter side of 256, 512, 1024 and 2048 px and encoded as JPEG (q90), and at
512 px as PNG and lossless WebP. Ways, on one thread, interleaved round by round, timed in CPU seconds of this process
(``time.process_time``: on a shared machine other work slows the wall clock, not the CPU time an image costs), the
best round of each counted:

Decode alone, to a uint8 array/tensor:
- ``PIL``: ``decode_rgb`` (PIL's libjpeg-turbo, with JPEG draft mode for the model's resize target) + a tensor.
- ``torchvision``: ``torchvision.io.decode_jpeg`` / ``decode_png`` / ``decode_webp`` at full size (no draft).
- ``per image``: ``decode_tensor``, the ``cpu`` decoder's choice (torchvision for JPEGs draft mode leaves at full
  size, PIL for the rest); its pixels are checked equal to ``decode_rgb``'s on every image.

Decode + preprocessing, to the model's input:
- ``pil loader``: ``decode_rgb`` with draft + timm's eval transform (the ``pil`` decoder).
- ``cpu loader``: ``decode_tensor`` + ``resize_crop`` (the ``cpu`` decoder, the CPU default).
Both are compared with the exact path (full PIL decode + timm's transform): worst cosine and mean absolute difference
of the model input. Last, both loaders end to end over all JPEG sizes in their thread pools (2 threads, as many as
the cores here), images/s of wall time and per CPU second.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable

import numpy as np
import timm
import torch
from PIL import Image

from imgcurate.embedders import TimmImageEmbedder
from imgcurate.embedders.decode import decode_rgb, decode_tensor
from imgcurate.embedders.loaders import CpuLoader, PilLoader, resize_crop

PASSES = 3  # passes over a set per timing
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")


def photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def encode(image: Image.Image, shorter: int, fmt: str) -> bytes:
    scale = shorter / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    kwargs = {"JPEG": {"quality": 90}, "WEBP": {"lossless": True}}.get(fmt, {})
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def torchvision_decoder(fmt: str) -> Callable[[bytes], torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png, decode_webp

    fn = {"JPEG": decode_jpeg, "PNG": decode_png, "WEBP": decode_webp}[fmt]
    return lambda d: fn(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)


def best_rates(ways: dict[str, Callable[[bytes], object]], datas: list[bytes], rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in ways.items():
            start = time.process_time()
            for _ in range(PASSES):
                for d in datas:
                    fn(d)
            best[name] = max(best.get(name, 0.0), PASSES * len(datas) / (time.process_time() - start))
    return best


def threaded_rate(loader: PilLoader, datas: list[bytes]) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of a loader's thread pool over ``datas``."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(len(b.rows) for b in loader.decode_rows((i, d, None) for i, d in enumerate(datas)))
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    emb = TimmImageEmbedder(args.model, device="cpu")
    transform = timm.data.create_transform(**emb.data_config, is_training=False)
    spec, draft = emb.tensor_preprocessing(), emb.draft_size()
    images = photos()
    sets = {f"JPEG {s} px": ("JPEG", [encode(im, s, "JPEG") for im in images]) for s in (256, 512, 1024, 2048)}
    sets["PNG 512 px"] = ("PNG", [encode(im, 512, "PNG") for im in images])
    sets["WebP 512 px (lossless)"] = ("WEBP", [encode(im, 512, "WEBP") for im in images])
    print(
        f"{args.model}: resize to {spec.shorter} px, crop {spec.crop[0]}, {spec.interpolation}; JPEG draft keeps "
        f">= {2 * draft} px; {len(images)} photos per set; 1 thread, best of {args.rounds} interleaved rounds; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    print("\nDecode alone (images/s)")
    print("| set | PIL (draft) | torchvision (full size) | per image (`decode_tensor`) | per image / PIL | pixels |")
    print("|---|---:|---:|---:|---:|---|")
    for label, (fmt, datas) in sets.items():
        equal = all(
            np.array_equal(decode_tensor(d, draft).permute(1, 2, 0).numpy(), decode_rgb(d, draft)) for d in datas
        )
        ways = {
            "pil": lambda d: torch.from_numpy(np.array(decode_rgb(d, draft))),
            "torchvision": torchvision_decoder(fmt),
            "per image": lambda d: decode_tensor(d, draft),
        }
        r = best_rates(ways, datas, args.rounds)
        print(
            f"| {label} | {r['pil']:.0f} | {r['torchvision']:.0f} | {r['per image']:.0f} | "
            f"{r['per image'] / r['pil']:.2f} | {'equal to PIL' if equal else 'DIFFER'} |"
        )

    print("\nDecode + preprocessing to the model input (images/s; accuracy against full decode + timm's transform)")
    print("| set | pil loader | cpu loader | cpu / pil | worst cosine pil, cpu | worst mean abs diff pil, cpu |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (_, datas) in sets.items():
        ways = {
            "pil": lambda d: transform(decode_rgb(d, draft)),
            "cpu": lambda d: resize_crop(spec, decode_tensor(d, draft)),
        }
        r = best_rates(ways, datas, args.rounds)
        exact = [transform(decode_rgb(d)).double() for d in datas]
        cos, mad = {}, {}
        for name, fn in ways.items():
            got = [fn(d).double() for d in datas]
            cos[name] = min(
                torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()
                for a, b in zip(exact, got, strict=True)
            )
            mad[name] = max((a - b).abs().mean().item() for a, b in zip(exact, got, strict=True))
        print(
            f"| {label} | {r['pil']:.0f} | {r['cpu']:.0f} | {r['cpu'] / r['pil']:.2f} | {cos['pil']:.5f}, "
            f"{cos['cpu']:.5f} | {mad['pil']:.4f}, {mad['cpu']:.4f} |"
        )

    jpegs = [d for label, (fmt, datas) in sets.items() if fmt == "JPEG" for d in datas] * 2
    pil = PilLoader(emb.preprocess, batch_size=16, num_threads=2, draft_size=draft)
    cpu = CpuLoader(spec, batch_size=16, num_threads=2, draft_size=draft)
    wall, per_cpu = {"pil": 0.0, "cpu": 0.0}, {"pil": 0.0, "cpu": 0.0}
    for _ in range(args.rounds):
        for name, loader in (("pil", pil), ("cpu", cpu)):
            w, c = threaded_rate(loader, jpegs)
            wall[name], per_cpu[name] = max(wall[name], w), max(per_cpu[name], c)
    print(
        f"\nLoaders in their thread pools (2 threads), the {len(jpegs)} JPEGs of every size: pil {wall['pil']:.0f} "
        f"img/s ({per_cpu['pil']:.0f} per CPU second), cpu {wall['cpu']:.0f} img/s ({per_cpu['cpu']:.0f} per CPU "
        f"second): {wall['cpu'] / wall['pil']:.2f}x wall, {per_cpu['cpu'] / per_cpu['pil']:.2f}x per CPU second"
    )


if __name__ == "__main__":
    main()
