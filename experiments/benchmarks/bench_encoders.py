"""Benchmark the encoders at paper resolution: images/s and peak memory, random weights.

Random weights run exactly as fast as pretrained ones, so no download is needed. Each encoder runs in
a fresh subprocess so that its peak RSS (CPU) or peak allocated memory (CUDA) is its own.

    python experiments/benchmarks/bench_encoders.py [--device cpu|cuda] [--batch-size 2] [--iters 2]
        [--encoders clip_vit_l14_336 dinov3_vitb16 dinov2_vitb14 clip_vit_b16] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import describe_machine  # sibling module: run these scripts as files

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"
DEFAULT_ENCODERS = ("clip_vit_l14_336", "dinov3_vitb16", "dinov2_vitb14", "clip_vit_b16")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, device: str, batch_size: int, iters: int, warmup: int, precision: str) -> dict:
    """Build one encoder with random weights and time ``iters`` batches after ``warmup`` ones."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.pretrained = None
    cfg.precision = precision
    started = time.perf_counter()
    encoder = instantiate(cfg).to(device)
    build_s = time.perf_counter() - started
    side = encoder.image_size
    images = torch.randn(batch_size, 3, side, side, device=device)
    baseline = _rss_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    for _ in range(warmup):
        encoder(images)
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        encoder(images)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = min(times)
    result = {
        "encoder": name,
        "image_size": side,
        "grid": encoder.grid_size,
        "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "batch_size": batch_size,
        "precision": precision,
        "seconds_per_batch": best,
        "images_per_s": batch_size / best,
        "build_s": build_s,
        "peak_rss_mib": _rss_mib(),
        "forward_extra_rss_mib": _rss_mib() - baseline,
    }
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["forward_extra_gpu_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--batch-size-large", type=int, default=None, help="batch size for ViT-L (default: same)"
    )
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()

    if args.single:
        batch = args.batch_size
        if args.batch_size_large and "l14" in args.single:
            batch = args.batch_size_large
        result = measure(args.single, args.device, batch, args.iters, args.warmup, args.precision)
        print(json.dumps(result))
        return

    results = []
    for name in args.encoders:
        command = [
            sys.executable,
            __file__,
            "--single",
            name,
            "--device",
            args.device,
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--precision",
            args.precision,
        ]
        if args.batch_size_large:
            command += ["--batch-size-large", str(args.batch_size_large)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"done: {name}", file=sys.stderr)

    print(f"machine: {describe_machine(args.device)}")
    print(f"command: {' '.join(sys.argv)}")
    gpu = args.device == "cuda"
    header = (
        "| encoder | input | grid | params (M) | batch | precision | s/batch | images/s | peak RSS (MiB) |"
    )
    header += " peak GPU (MiB) |" if gpu else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        row = (
            f"| {r['encoder']} | {r['image_size']} | {r['grid']}×{r['grid']} | {r['params_m']:.0f} | "
            f"{r['batch_size']} | {r['precision']} | {r['seconds_per_batch']:.2f} | {r['images_per_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
        row += f" {r['peak_gpu_mib']:.0f} |" if gpu else ""
        print(row)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": describe_machine(args.device), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
