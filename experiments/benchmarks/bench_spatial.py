"""Benchmark RAD's windowed patch 1-NN: anomret's Triton kernel and torch path against the official loop.

The official code (RAD `eval_patch_knn_multilayer_cluster`) gathers the K retrieved patch maps of one test
image, normalises them, then for each of the h·w positions builds the window's index list, gathers those
candidates, takes one matmul and a max. `official_loop` below does exactly that. All methods run on the
same random inputs (fp16 bank, as anomret stores it, on the measured device) and must give the same
numbers. Each (configuration, method) runs in a fresh subprocess so its peak memory is its own; a slow
loop can be timed on a subset of positions and extrapolated to the full grid (said so in the output).

    python experiments/benchmarks/bench_spatial.py [--device cpu|cuda] [--repeats 3] [--batch 8]
        [--configs 150:1 900:2] [--grid 28] [--dim 768] [--loop-positions 784] [--loop-batch N]
        [--layers 1] [--candidates]

Methods: ``kernel`` (``backend="triton"``, CUDA only), ``torch`` (``backend="torch"``), ``loop``. Per
method: ms per image and layer, speed-up over the loop, achieved GB/s against the bytes of the K·h·w·D
stored values each image must read, the largest difference to the loop (and, on CUDA, to a float64
computation), and the extra peak memory (GPU on CUDA, resident on CPU).
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

GPU_TIMED_RUNS = 20  # fast methods on CUDA: best of this many runs after a warm-up


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _inputs(
    k: int, batch: int, grid: int, dim: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query ``[B, g, g, D]`` float32 and bank ``[K + 16, g, g, D]`` fp16 on ``device``; CPU neighbours."""
    generator = torch.Generator(device).manual_seed(seed)
    n_bank = k + 16  # only the K retrieved rows are ever read, so N only costs memory
    bank = torch.empty(n_bank, grid, grid, dim, dtype=torch.float16, device=device)
    for start in range(0, n_bank, 32):  # built in slices so no float32 copy of the whole bank exists
        rows = bank[start : start + 32]
        rows.copy_(torch.randn(rows.shape, generator=generator, device=device))
    query = torch.randn(batch, grid, grid, dim, generator=generator, device=device)
    picks = torch.Generator().manual_seed(seed)
    neighbors = torch.stack([torch.randperm(n_bank, generator=picks)[:k] for _ in range(batch)])
    return query, bank, neighbors


def official_loop(query: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor, rho: int, positions):
    """The reference implementation's loop for one layer: per image, per position, gather-matmul-max."""
    _, h, w, dim = query.shape
    scores = torch.empty(query.shape[0], len(positions), device=query.device)
    for b in range(query.shape[0]):
        ref = bank[neighbors[b].to(bank.device)].float().reshape(-1, h * w, dim)
        ref = F.normalize(ref, dim=-1)
        q = F.normalize(query[b].reshape(h * w, dim).float(), dim=-1)
        for slot, j in enumerate(positions):
            r, c = divmod(j, w)
            window = [
                rr * w + cc
                for rr in range(max(0, r - rho), min(h, r + rho + 1))
                for cc in range(max(0, c - rho), min(w, c + rho + 1))
            ]
            index = torch.tensor(window, device=query.device)
            candidates = ref[:, index, :].reshape(-1, dim)
            scores[b, slot] = 1 - (q[j : j + 1] @ candidates.T).max()
    return scores


def shift_and_compare(
    query: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor, rho: int, chunk: int = 32
):
    """Candidate kept for comparison: per offset, dot the query grid with the shifted neighbour grids."""
    _, h, w, _ = query.shape
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


def _timed(fn, device: str, runs: int, warm_up: bool = False):
    """``fn``'s result and its best wall time over ``runs`` calls (after one untimed call if ``warm_up``)."""
    if warm_up:
        fn()
    result, times = None, []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, min(times)


def measure(method: str, k: int, rho: int, batch: int, args) -> dict:
    from anomret.retrieval import spatial_knn_scores

    device, grid, dim, layers = args.device, args.grid, args.dim, args.layers
    query, bank, neighbors = _inputs(k, batch, grid, dim, device)
    cells = grid * grid
    baseline = _current_rss_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    row: dict = {"method": method, "k": k, "rho": rho, "batch": batch, "layers": layers}
    if method in ("kernel", "torch"):
        backend = "triton" if method == "kernel" else "torch"
        fast = device == "cuda"
        scores, seconds = _timed(
            lambda: _per_layer(
                lambda: spatial_knn_scores(query, bank, neighbors, rho, backend=backend), layers
            ),
            device,
            max(args.repeats, GPU_TIMED_RUNS) if fast else args.repeats,
            warm_up=fast,
        )
        row["seconds_per_image_layer"] = seconds / batch / layers
        row["extra_peak_rss_mib"] = max(0.0, _peak_rss_mib() - baseline)
        if device == "cuda":
            row["extra_peak_gpu_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        # The reference loop on the first image (all positions on a GPU, a sample on a CPU).
        check = list(range(cells)) if fast else list(range(0, cells, 97))
        expected = official_loop(query[:1], bank, neighbors[:1], rho, check)
        row["max_abs_diff_vs_loop"] = (scores[0].reshape(-1)[check] - expected[0]).abs().max().item()
        if fast:
            exact = spatial_knn_scores(query[:1].double(), bank, neighbors[:1], rho, backend="torch")
            row["max_abs_diff_vs_float64"] = (scores[:1].double() - exact).abs().max().item()
    elif method == "loop":
        subset = list(range(0, cells, max(1, cells // args.loop_positions)))[: args.loop_positions]
        # Time the setup (gather + normalise) and the per-position loop apart, to extrapolate a subset.
        setup = lambda: official_loop(query, bank, neighbors, rho, [])  # noqa: E731
        _, setup_seconds = _timed(lambda: [setup() for _ in range(layers)], device, args.repeats)
        scores, seconds = _timed(
            lambda: _per_layer(lambda: official_loop(query, bank, neighbors, rho, subset), layers),
            device,
            args.repeats,
        )
        per_position = (seconds - setup_seconds) / len(subset)
        row["seconds_per_image_layer"] = (setup_seconds + per_position * cells) / batch / layers
        row["positions_timed"] = len(subset)
        row["extra_peak_rss_mib"] = max(0.0, _peak_rss_mib() - baseline)
        if device == "cuda":
            row["extra_peak_gpu_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        expected = spatial_knn_scores(query, bank, neighbors, rho, backend="torch").reshape(batch, -1)
        row["max_abs_diff_vs_loop"] = (scores - expected[:, subset]).abs().max().item()
    else:
        raise ValueError(method)
    stored_bytes = k * cells * dim * bank.element_size()
    row["stored_gb_per_image_layer"] = stored_bytes / 1e9
    row["gb_per_s"] = stored_bytes / row["seconds_per_image_layer"] / 1e9
    return row


def candidates(k: int, rho: int, args) -> None:
    """Time the exact candidates on one batch (same process, interleaved runs)."""
    from anomret.retrieval import spatial_knn_scores

    device = args.device
    query, bank, neighbors = _inputs(k, args.batch if device == "cuda" else 1, args.grid, args.dim, device)
    runs = {
        f"torch tile={t}": (
            lambda t=t: spatial_knn_scores(query, bank, neighbors, rho, tile=t, backend="torch")
        )
        for t in (1, 2, 4)
    }
    if device == "cuda":
        from anomret.retrieval.spatial_triton import WindowMax

        unit = F.normalize(query.float(), dim=-1)
        device_neighbors = neighbors.to(query.device)

        def kernel(block_k: int, num_warps: int) -> torch.Tensor:
            window = WindowMax(unit, rho)
            window.fold(bank, device_neighbors, block_k=block_k, num_warps=num_warps)
            return window.scores()

        for block_k in (32, 64, 128):
            for num_warps in (4, 8):
                runs[f"kernel block_k={block_k} warps={num_warps}"] = lambda b=block_k, n=num_warps: kernel(
                    b, n
                )
        runs["torch query_chunk=B neighbor_chunk=64"] = lambda: spatial_knn_scores(
            query, bank, neighbors, rho, query_chunk=query.shape[0], neighbor_chunk=64, backend="torch"
        )
    runs["shift-and-compare"] = lambda: shift_and_compare(query, bank, neighbors, rho)
    runs_each = max(args.repeats, 5) if device == "cuda" else args.repeats
    best = dict.fromkeys(runs, float("inf"))
    reference = runs["torch tile=1"]()
    for fn in runs.values():  # compiles the kernels; checks every candidate gives the same numbers
        assert (fn() - reference).abs().max() < 1e-5
    for _ in range(runs_each):
        for name, fn in runs.items():
            _, seconds = _timed(fn, device, 1)
            best[name] = min(best[name], seconds)
    print(f"\ncandidates, K={k}, rho={rho}, {query.shape[0]} image(s), one layer (best of {runs_each}):")
    for name, seconds in best.items():
        print(f"  {name:40s} {seconds / query.shape[0] * 1e3:9.3f} ms / image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=28, help="grid side h = w (paper: 28)")
    parser.add_argument("--dim", type=int, default=768, help="patch feature size D (paper: 768)")
    parser.add_argument("--layers", type=int, default=1, help="layers scored per image (RAD: 4)")
    parser.add_argument("--configs", nargs="+", default=["150:1", "900:2"], help="K:rho pairs")
    parser.add_argument("--loop-positions", type=int, default=28 * 28, help="positions the loop times")
    parser.add_argument("--loop-batch", type=int, help="images the loop times (default: --batch)")
    parser.add_argument("--candidates", action="store_true", help="also time the exact candidates")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        method, k, rho, batch = args.one.split(":")
        print(json.dumps(measure(method, int(k), int(rho), int(batch), args)))
        return
    cuda = args.device == "cuda"
    print(f"machine: {describe_machine(args.device)}")
    timing = f"best of {args.repeats}"
    if cuda:
        timing = f"best of {max(args.repeats, GPU_TIMED_RUNS)} after a warm-up ({timing} for the loop)"
    print(f"grid {args.grid}x{args.grid}, D {args.dim}, fp16 bank on {args.device}, {args.layers} layer(s)")
    print(f"{timing}" + ("" if cuda else "; the Triton kernel needs --device cuda") + "\n")
    memory = "extra peak GPU (MiB)" if cuda else "extra peak RSS (MiB)"
    exact = " max \\|Δ\\| vs float64 |" if cuda else ""
    print(
        f"| K | ρ | method | images | ms / image / layer | speed-up vs loop | GB/s | {memory} |"
        f" max \\|Δ\\| vs loop |{exact} note |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---|")
    methods = ["loop", "torch"] + (["kernel"] if cuda else [])
    for config in args.configs:
        k, rho = config.split(":")
        rows, failures = {}, {}
        for method in methods:
            batch = (args.loop_batch or args.batch) if method == "loop" else args.batch
            command = [sys.executable, __file__, "--one", f"{method}:{k}:{rho}:{batch}"]
            for option in ("device", "repeats", "grid", "dim", "layers", "loop_positions"):
                command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            run = subprocess.run(command, capture_output=True, text=True, check=False)
            if run.returncode == 0:
                rows[method] = json.loads(run.stdout)
            else:  # one failed method must not cost the others' figures
                failures[method] = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(run.stderr[-3000:], file=sys.stderr)
        loop_seconds = rows["loop"]["seconds_per_image_layer"] if "loop" in rows else float("nan")
        for method in reversed(methods):
            if method in failures:
                cells = [k, rho, method] + [""] * (7 if cuda else 6) + [f"failed: {failures[method]}"]
                print("| " + " | ".join(cells) + " |")
                continue
            row = rows[method]
            note = ""
            if method == "loop" and row["positions_timed"] < args.grid**2:
                note = f"timed on {row['positions_timed']} positions, extrapolated to {args.grid**2}"
            peak = row["extra_peak_gpu_mib"] if cuda else row["extra_peak_rss_mib"]
            vs_float64 = ""
            if cuda:
                vs_float64 = f" {row['max_abs_diff_vs_float64']:.1e} |" if method != "loop" else " |"
            rate = row["gb_per_s"]
            print(
                f"| {k} | {rho} | {method} | {row['batch']} | {row['seconds_per_image_layer'] * 1e3:.3f} | "
                f"{loop_seconds / row['seconds_per_image_layer']:.1f}× | {rate:.{1 if rate >= 1 else 3}f} | "
                f"{peak:.0f} | {row['max_abs_diff_vs_loop']:.1e} |{vs_float64} {note} |",
                flush=True,
            )
    print("\nGB/s: the K·h·w·D stored fp16 values one image must read for one layer, over its time.")
    if args.candidates:
        for config in args.configs:
            k, rho = config.split(":")
            candidates(int(k), int(rho), args)


if __name__ == "__main__":
    main()
