"""Model-only CPU throughput before/after each CPU setting: glibc malloc, batch size, channels-last, thread layout.

    python benchmarks/cpu_alloc.py [--models resnet50,efficientnet_lite0] [--rounds 3] [--seconds 6]

Every configuration runs in a fresh process (malloc settings are per process and cannot be undone cleanly), the
configurations interleaved round by round; the best round of each is kept (a shared machine only ever slows a run).
Also printed: minor page faults per image (``getrusage``), the cost that :func:`imgcurate.cpu.keep_freed_memory`
removes. torch fp32, seeded random weights, random input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (keep freed memory, batch size, channels-last, processes x threads)
CONFIGS = {
    "default malloc, batch 64": (False, 64, False, (1, 2)),
    "keep freed memory, batch 64": (True, 64, False, (1, 2)),
    "keep freed memory, batch 16": (True, 16, False, (1, 2)),
    "+ channels-last, batch 16": (True, 16, True, (1, 2)),
    "+ 2 processes x 1 thread": (True, 16, True, (2, 1)),
}


def child(model_name: str, keep: bool, batch: int, channels_last: bool, threads: int, seconds: float) -> None:
    import resource

    import torch

    from imgcurate import cpu
    from imgcurate.embedders import TimmImageEmbedder

    if keep:
        assert cpu.keep_freed_memory()
    torch.set_num_threads(threads)
    model = TimmImageEmbedder(model_name).load_model("cpu")
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        rate = n / (time.perf_counter() - start)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    print("RESULT " + json.dumps({"rate": rate, "faults": faults}), flush=True)


def run(model_name: str, config: tuple, seconds: float) -> dict:
    keep, batch, cl, (procs, threads) = config
    cmd = [sys.executable, __file__, "--child", model_name, str(int(keep)), str(batch), str(int(cl)), str(threads)]
    cmd += ["--seconds", str(seconds)]
    env = {**os.environ, "PYTHONPATH": HERE}
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    results = []
    for p in running:
        out, _ = p.communicate()
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    return {"rate": sum(r["rate"] for r in results), "faults": sum(r["faults"] for r in results) / procs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet50,efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, keep, batch, cl, threads = args.child
        return child(name, keep == "1", int(batch), cl == "1", int(threads), args.seconds)
    for name in args.models.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for label, config in CONFIGS.items():
                r = run(name, config, args.seconds)
                if label not in best or r["rate"] > best[label]["rate"]:
                    best[label] = r
        base = best["default malloc, batch 64"]["rate"]
        print(f"{name} (torch fp32, 2 cores, best of {args.rounds} interleaved rounds)")
        for label, r in best.items():
            print(f"  {label:<30} {r['rate']:7.1f} img/s  {r['rate'] / base:5.2f}x  {r['faults']:8.0f} page faults/img")


if __name__ == "__main__":
    main()
