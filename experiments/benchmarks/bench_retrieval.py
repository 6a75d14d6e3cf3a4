"""Benchmark MRAD softmax retrieval: time and peak memory against the memory-bank size.

Each configuration runs in a fresh subprocess so its peak RSS is its own. The query is one batch of
8 images at the MRAD grid (37×37 patches, 1024-d), as in the MRAD-TF test pass.

    python experiments/benchmarks/bench_retrieval.py [--sizes 3000 30000 300000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from machine import describe_machine  # sibling module: run these scripts as files


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _unit_rows(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    # In place, so building the inputs never peaks above their own size.
    tensor = torch.randn(rows, dim, generator=generator)
    return tensor.div_(tensor.norm(dim=1, keepdim=True))


def measure(bank_size: int, key_chunk: int, device: str, repeats: int) -> dict:
    from anomret.retrieval import softmax_retrieve

    generator = torch.Generator().manual_seed(0)
    query = _unit_rows(8 * 37 * 37, 1024, generator).view(8, 37, 37, 1024).to(device)
    keys = _unit_rows(bank_size, 1024, generator).to(device)
    values = torch.zeros(bank_size, 2)
    values[torch.arange(bank_size) % 2 == 0, 0] = 1
    values[:, 1] = 1 - values[:, 0]
    values = values.to(device)
    baseline = _current_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    softmax_retrieve(query, keys, values, key_chunk=key_chunk)  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        softmax_retrieve(query, keys, values, key_chunk=key_chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "bank_size": bank_size,
        "key_chunk": key_chunk,
        "seconds_per_batch": min(times),
        "extra_peak_mib": max(0.0, _peak_rss_mib() - baseline),
        "inputs_mib": (query.numel() + keys.numel() + values.numel()) * 4 / 2**20,
    }
    if device == "cuda":
        result["extra_peak_gpu_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000, 300000])
    parser.add_argument("--key-chunk", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.key_chunk, args.device, args.repeats)))
        return
    print(f"machine: {describe_machine(args.device)}")
    print("| bank entries | key chunk | s / batch of 8 | extra peak RSS (MiB) | inputs (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        command = [sys.executable, __file__, "--one", str(size), "--key-chunk", str(args.key_chunk)]
        command += ["--device", args.device, "--repeats", str(args.repeats)]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(
            f"| {row['bank_size']:,} | {row['key_chunk']:,} | {row['seconds_per_batch']:.3f} | "
            f"{row['extra_peak_mib']:.0f} | {row['inputs_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
