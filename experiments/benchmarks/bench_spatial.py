"""Benchmark RAD's windowed patch 1-NN: anomret's batched function against the official per-position loop.

The official code (RAD `eval_patch_knn_multilayer_cluster`) gathers the K retrieved patch maps of one test
image, normalises them, then for each of the h·w positions builds the window's index list, gathers those
candidates, takes one matmul and a max. `official_loop` below does exactly that. Both run on the same
random inputs (fp16 bank, as anomret stores it) and must give the same numbers. Each configuration runs
in a fresh subprocess so its peak memory is its own; a slow loop can be timed on a subset of positions
and extrapolated to the full grid (said so in the output).

    python experiments/benchmarks/bench_spatial.py [--device cpu|cuda] [--repeats 2] [--batch 8]
        [--configs 150:1 900:2] [--loop-positions 784] [--layers 1] [--candidates]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from machine import describe_machine  # sibling module: run these scripts as files

GRID, DIM = 28, 768


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _inputs(
    k: int, batch: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n_bank = k + 16  # only the K retrieved rows are ever read, so N only costs memory
    bank = torch.empty(n_bank, GRID, GRID, DIM, dtype=torch.float16)
    for start in range(0, n_bank, 32):  # built in slices so no float32 copy of the whole bank exists
        rows = bank[start : start + 32]
        rows.copy_(torch.randn(rows.shape, generator=generator))
    query = torch.randn(batch, GRID, GRID, DIM, generator=generator)
    neighbors = torch.stack([torch.randperm(n_bank, generator=generator)[:k] for _ in range(batch)])
    return query.to(device), bank.to(device), neighbors


def official_loop(query: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor, rho: int, positions):
    """The reference implementation's loop for one layer: per image, per position, gather-matmul-max."""
    h = w = GRID
    scores = torch.empty(query.shape[0], len(positions), device=query.device)
    for b in range(query.shape[0]):
        ref = bank[neighbors[b].to(bank.device)].float().reshape(-1, h * w, DIM)
        ref = F.normalize(ref, dim=-1)
        q = F.normalize(query[b].reshape(h * w, DIM).float(), dim=-1)
        for slot, j in enumerate(positions):
            r, c = divmod(j, w)
            window = [
                rr * w + cc
                for rr in range(max(0, r - rho), min(h, r + rho + 1))
                for cc in range(max(0, c - rho), min(w, c + rho + 1))
            ]
            index = torch.tensor(window, device=query.device)
            candidates = ref[:, index, :].reshape(-1, DIM)
            scores[b, slot] = 1 - (q[j : j + 1] @ candidates.T).max()
    return scores


def shift_and_compare(
    query: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor, rho: int, chunk: int = 32
):
    """Candidate kept for comparison: per offset, dot the query grid with the shifted neighbour grids."""
    h = w = GRID
    out = torch.empty(query.shape[0], h, w, device=query.device)
    for b in range(query.shape[0]):
        q = F.normalize(query[b].float(), dim=-1)
        best = torch.full((h, w), -torch.inf, device=query.device)
        for k0 in range(0, neighbors.shape[1], chunk):
            ref = F.normalize(bank[neighbors[b, k0 : k0 + chunk].to(bank.device)].float(), dim=-1)
            for dy in range(-rho, rho + 1):
                for dx in range(-rho, rho + 1):
                    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
                    dots = torch.einsum(
                        "yxd,kyxd->kyx", q[y0:y1, x0:x1], ref[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
                    )
                    torch.maximum(best[y0:y1, x0:x1], dots.amax(dim=0), out=best[y0:y1, x0:x1])
        out[b] = 1 - best
    return out


def _per_layer(fn, layers: int):
    """Run one layer's work ``layers`` times (all layers cost the same), returning the last result."""
    for _ in range(layers):
        result = fn()
    return result


def _timed(fn, device: str, repeats: int):
    result, times = None, []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, min(times)


def measure(
    method: str, k: int, rho: int, batch: int, layers: int, device: str, repeats: int, positions: int
):
    from anomret.retrieval import spatial_knn_scores

    query, bank, neighbors = _inputs(k, batch, device)
    baseline = _current_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    row = {"method": method, "k": k, "rho": rho, "batch": batch, "layers": layers}
    if method == "anomret":
        scores, seconds = _timed(
            lambda: _per_layer(lambda: spatial_knn_scores(query, bank, neighbors, rho), layers),
            device,
            repeats,
        )
        row["seconds_per_image"] = seconds / batch
        row["extra_peak_rss_mib"] = max(0.0, _peak_rss_mib() - baseline)
        # The reference on a few positions of the first image, to show both compute the same numbers.
        check = list(range(0, GRID * GRID, 97))
        expected = official_loop(query[:1], bank, neighbors[:1], rho, check)
        row["max_abs_diff_vs_loop"] = (scores[0].reshape(-1)[check] - expected[0]).abs().max().item()
    elif method == "loop":
        subset = list(range(0, GRID * GRID, max(1, (GRID * GRID) // positions)))[:positions]
        # Time the setup (gather + normalise) and the per-position loop apart, to extrapolate a subset.
        setup = lambda: official_loop(query, bank, neighbors, rho, [])  # noqa: E731
        _, setup_seconds = _timed(lambda: [setup() for _ in range(layers)], device, repeats)
        scores, seconds = _timed(
            lambda: _per_layer(lambda: official_loop(query, bank, neighbors, rho, subset), layers),
            device,
            repeats,
        )
        per_position = (seconds - setup_seconds) / len(subset)
        row["seconds_per_image"] = (setup_seconds + per_position * GRID * GRID) / batch
        row["positions_timed"] = len(subset)
        row["extra_peak_rss_mib"] = max(0.0, _peak_rss_mib() - baseline)
        expected = spatial_knn_scores(query, bank, neighbors, rho).reshape(batch, -1)[:, subset]
        row["max_abs_diff_vs_loop"] = (scores - expected).abs().max().item()
    else:
        raise ValueError(method)
    row["bank_rows_mib"] = k * GRID * GRID * DIM * 2 / 2**20
    if device == "cuda":
        row["extra_peak_gpu_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return row


def candidates(k: int, rho: int, device: str, repeats: int) -> None:
    """Time the exact candidates on one image (same process, interleaved repeats)."""
    from anomret.retrieval import spatial_knn_scores

    query, bank, neighbors = _inputs(k, 1, device)
    runs = {
        f"anomret tile={t}": (lambda t=t: spatial_knn_scores(query, bank, neighbors, rho, tile=t))
        for t in (1, 2, 4)
    }
    runs["shift-and-compare"] = lambda: shift_and_compare(query, bank, neighbors, rho)
    best = dict.fromkeys(runs, float("inf"))
    reference = runs["anomret tile=1"]()
    for _ in range(repeats):
        for name, fn in runs.items():
            result, seconds = _timed(fn, device, 1)
            best[name] = min(best[name], seconds)
            assert (result - reference).abs().max() < 1e-5, name
    print(f"\ncandidates, K={k}, rho={rho}, one image, one layer (best of {repeats}):")
    for name, seconds in best.items():
        print(f"  {name:22s} {seconds:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1, help="layers scored per image (RAD: 4)")
    parser.add_argument("--configs", nargs="+", default=["150:1", "900:2"], help="K:rho pairs")
    parser.add_argument("--loop-positions", type=int, default=GRID * GRID, help="positions the loop times")
    parser.add_argument("--loop-batch", type=int, help="images the loop times (default: --batch)")
    parser.add_argument("--candidates", action="store_true", help="also time the exact candidates")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        method, k, rho, batch = args.one.split(":")
        row = measure(
            method, int(k), int(rho), int(batch), args.layers, args.device, args.repeats, args.loop_positions
        )
        print(json.dumps(row))
        return
    print(f"machine: {describe_machine(args.device)}")
    print(f"grid {GRID}x{GRID}, D {DIM}, fp16 bank, {args.layers} layer(s), best of {args.repeats}\n")
    header = "| K | ρ | method | images | s / image | extra peak RSS (MiB) |"
    header += " extra peak GPU (MiB) |" if args.device == "cuda" else ""
    print(header + " max |Δ| vs loop | note |")
    print("|---:|---:|---|---:|---:|---:|" + ("---:|" if args.device == "cuda" else "") + "---:|---|")
    for config in args.configs:
        k, rho = config.split(":")
        rows = {}
        for method, batch in (("anomret", args.batch), ("loop", args.loop_batch or args.batch)):
            command = [sys.executable, __file__, "--one", f"{method}:{k}:{rho}:{batch}"]
            command += ["--device", args.device, "--repeats", str(args.repeats), "--layers", str(args.layers)]
            command += ["--loop-positions", str(args.loop_positions)]
            rows[method] = row = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout
            )
            note = ""
            if method == "loop" and row["positions_timed"] < GRID * GRID:
                note = f"loop timed on {row['positions_timed']} positions, extrapolated to {GRID * GRID}"
            gpu = f" {row['extra_peak_gpu_mib']:.0f} |" if args.device == "cuda" else ""
            print(
                f"| {k} | {rho} | {method} | {batch} | {row['seconds_per_image']:.3f} | "
                f"{row['extra_peak_rss_mib']:.0f} |{gpu} {row['max_abs_diff_vs_loop']:.1e} | {note} |",
                flush=True,
            )
        speedup = rows["loop"]["seconds_per_image"] / rows["anomret"]["seconds_per_image"]
        print(
            f"|  |  | speed-up K={k} ρ={rho} | | {speedup:.1f}× | | "
            + ("| " if args.device == "cuda" else "")
            + "| |"
        )
    if args.candidates:
        for config in args.configs:
            k, rho = config.split(":")
            candidates(int(k), int(rho), args.device, args.repeats)


if __name__ == "__main__":
    main()
