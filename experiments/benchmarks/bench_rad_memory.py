"""RAD's normal-image memory: bank size and metric change of fp16 / int8 storage against fp32, and the
per-image scoring time from a memory-mapped bank.

Part 1 (synthetic data): ``+experiment=demo_rad`` is run end to end three times, with ``memory.dtype``
fp32, fp16 and int8 (real Trainer, real bank files); the script reports each bank's file size and the
change of every mean metric against fp32.

Part 2 (paper shape): a random bank of N images with four 28×28×768 layers is written in each dtype,
opened memory-mapped, and the full RAD score of a test image (global top-K, 4 layers of windowed 1-NN,
layer mean) is timed; the largest score difference against fp32 is reported.

Part 3 (building): a bank of ``--build-images`` random images of that shape is built through the real
builder (``add`` per batch, the gathered states merged, ``build``, ``save``) in fresh processes, one or
``--build-world`` gloo processes (the DDP merge), and each process's peak RSS is reported. Run it with
``PYTHONPATH`` pointing at another checkout to measure that checkout's builder.

    cd experiments/benchmarks
    python bench_rad_memory.py [--n-bank 160] [--k 150] [--rho 1] [--images 2] [--repeats 2] [--device cpu|cuda]
        [--skip-synthetic] [--skip-paper-shape] [--skip-build] [--build-images 128] [--build-batch 8]
        [--build-world 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_machine  # sibling module: run these scripts as files

DTYPES = ("fp32", "fp16", "int8")


def synthetic_runs(work: Path) -> dict[str, dict]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from anomret.config import config_dir
    from anomret.pipeline import run

    out = {}
    for dtype in DTYPES:
        bank = work / f"bank_{dtype}.safetensors"
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "+experiment=demo_rad",
                    f"paths.root_dir={work}",
                    f"paths.data_dir={work / 'data'}",
                    f"paths.output_dir={work / dtype}",
                    f"memory.path={bank}",
                    f"memory.dtype={dtype}",
                    "logger=none",
                ],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
            cfg.callbacks = None
            del cfg["hydra"]
        result = run(cfg, fit=True)
        out[dtype] = {"bank_bytes": bank.stat().st_size, "mean": result.mean}
    GlobalHydra.instance().clear()
    return out


def paper_shape(
    work: Path, n_bank: int, k: int, rho: int, images: int, device: str, repeats: int
) -> dict[str, dict]:
    from anomret.encoders.base import Features
    from anomret.memory.normal_bank import NormalMemoryBank
    from anomret.memory.normal_builder import NormalBankBuilder
    from anomret.retrieval.spatial import SpatialRetrieval

    layers, grid, dim = (3, 6, 9, 11), 28, 768
    generator = torch.Generator().manual_seed(0)
    # Correlated rows (a shared component per layer) so that nearest neighbours are meaningful.
    base = {layer: torch.randn(grid, grid, dim, generator=generator) for layer in layers}
    queries = Features(
        cls=torch.randn(images, dim, generator=generator),
        patches={
            layer: base[layer] + 0.8 * torch.randn(images, grid, grid, dim, generator=generator)
            for layer in layers
        },
    )
    retrieval = SpatialRetrieval(k=k, rho=rho)
    out: dict[str, dict] = {}
    reference = None
    for dtype in DTYPES:
        builder = NormalBankBuilder(layers, dtype)
        gen = torch.Generator().manual_seed(1)
        for start in range(0, n_bank, 16):
            n = min(16, n_bank - start)
            features = Features(
                cls=torch.randn(n, dim, generator=gen),
                patches={
                    layer: base[layer] + 0.8 * torch.randn(n, grid, grid, dim, generator=gen)
                    for layer in layers
                },
            )
            builder.add(features, {"index": torch.arange(start, start + n)})
        path = builder.build({"build": {"layers": list(layers), "dtype": dtype}}).save(
            work / f"paper_{dtype}.safetensors"
        )
        del builder
        bank = NormalMemoryBank.load(path).to(device)
        q = Features(queries.cls.to(device), {layer: t.to(device) for layer, t in queries.patches.items()})
        timings = []
        for _ in range(repeats):  # best of `repeats`: the first run also pays for page faults
            start = time.perf_counter()
            neighbors = retrieval.neighbors(q.cls, bank.cls)
            stored = {layer: rows.stored() for layer, rows in bank.patches.items()}
            scores = retrieval.scores(q.patches, stored, neighbors)
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) / images)
        seconds = min(timings)
        scores = scores.cpu()
        if reference is None:
            reference = scores
        out[dtype] = {
            "bank_bytes": path.stat().st_size,
            "bytes_per_image": path.stat().st_size / n_bank,
            "seconds_per_image": seconds,
            "rows_read_per_layer_per_run": bank.patches[layers[0]].rows_read // repeats,
            "max_abs_diff_vs_fp32": float((scores - reference).abs().max()),
        }
        path.unlink()
    return out


PAPER_LAYERS, PAPER_GRID, PAPER_DIM = (3, 6, 9, 11), 28, 768


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build_worker(rank: int, world: int, port: int, args: dict) -> None:
    """One process of a bank build: encode this process's share batch by batch, merge, rank 0 saves."""
    import torch.distributed as dist

    from anomret.distributed import all_gather
    from anomret.encoders.base import Features
    from anomret.memory.normal_builder import NormalBankBuilder

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    baseline = _rss_mib()
    path = Path(args["path"])
    builder = NormalBankBuilder(PAPER_LAYERS, args["dtype"])
    if "beside" in getattr(NormalBankBuilder, "__dataclass_fields__", {}):
        builder.beside = path  # scratch files beside the bank, as the pipeline places them
    n, batch = args["images"], args["batch"]
    for number, start in enumerate(range(0, n, batch)):
        if number % world != rank:  # strided shares, as a distributed sampler deals batches
            continue
        size = min(batch, n - start)
        gen = torch.Generator().manual_seed(start)  # the same rows whichever process encodes them
        features = Features(
            cls=torch.randn(size, PAPER_DIM, generator=gen),
            patches={
                layer: torch.randn(size, PAPER_GRID, PAPER_GRID, PAPER_DIM, generator=gen)
                for layer in PAPER_LAYERS
            },
        )
        builder.add(features, {"index": torch.arange(start, start + size)})
        del features
    after_pass = _peak_rss_mib()
    builder.load_states(all_gather(builder.state()))
    bank = builder.build({"build": {"layers": list(PAPER_LAYERS), "dtype": args["dtype"]}})
    if rank == 0:
        bank.save(path)
    if world > 1:
        dist.barrier()
    del bank
    if hasattr(builder, "close"):
        builder.close()
    report = {"baseline_mib": baseline, "peak_after_pass_mib": after_pass, "peak_mib": _peak_rss_mib()}
    Path(args["out"]).with_suffix(f".{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


def _build_child(spec: str) -> None:
    import torch.multiprocessing as mp

    args = json.loads(spec)
    world = args["world"]
    if world == 1:
        _build_worker(0, 1, 0, args)
    else:
        mp.spawn(_build_worker, args=(world, args["port"], args), nprocs=world, join=True)


def build_rss(work: Path, images: int, batch: int, worlds: list[int], dtype: str = "fp16") -> list[dict]:
    """Peak RSS of building a bank of ``images`` random paper-shape images, in fresh processes."""
    out = []
    for world in worlds:
        path, report = work / f"build_{world}.safetensors", work / f"build_{world}"
        spec = {
            "path": str(path),
            "out": str(report),
            "images": images,
            "batch": batch,
            "dtype": dtype,
            "world": world,
            "port": 29500 + os.getpid() % 1000,
        }
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-child", json.dumps(spec)], check=True)
        seconds = time.perf_counter() - start
        ranks = [json.loads(report.with_suffix(f".{rank}.json").read_text()) for rank in range(world)]
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(f".{path.name}")]
        out.append(
            {
                "world": world,
                "bank_mib": path.stat().st_size / 2**20,
                "batch_features_mib": batch * len(PAPER_LAYERS) * PAPER_GRID**2 * PAPER_DIM * 4 / 2**20,
                "seconds": seconds,
                "ranks": ranks,
                "scratch_left": leftovers,
            }
        )
        path.unlink()
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--build-child":
        _build_child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-bank", type=int, default=160)
    parser.add_argument("--k", type=int, default=150)
    parser.add_argument("--rho", type=int, default=1)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-paper-shape", action="store_true")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--build-images", type=int, default=128)
    parser.add_argument("--build-batch", type=int, default=8)
    parser.add_argument("--build-world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report: dict = {"machine": describe_machine(args.device)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_synthetic:
            runs = synthetic_runs(work)
            report["synthetic"] = runs
            print(
                "\nsynthetic data (demo_rad, tiny_vit random weights): mean metrics, change vs fp32 in points"
            )
            metrics = list(runs["fp32"]["mean"])
            print("| dtype | bank size (KiB) | " + " | ".join(metrics) + " |")
            for dtype, values in runs.items():
                changes = [100 * (values["mean"][m] - runs["fp32"]["mean"][m]) for m in metrics]
                cells = [
                    f"{values['mean'][m] * 100:.2f}" if dtype == "fp32" else f"{c:+.3f}"
                    for m, c in zip(metrics, changes, strict=True)
                ]
                print(f"| {dtype} | {values['bank_bytes'] / 1024:.0f} | " + " | ".join(cells) + " |")
        if not args.skip_paper_shape:
            shape = paper_shape(work, args.n_bank, args.k, args.rho, args.images, args.device, args.repeats)
            report["paper_shape"] = {"n_bank": args.n_bank, "k": args.k, "rho": args.rho, "results": shape}
            print(
                f"\npaper shape (4 layers × 28×28×768, N={args.n_bank}, K={args.k}, rho={args.rho}), memory-mapped"
            )
            print(
                "| dtype | MiB / image | s / image (4 layers) | rows read / layer | max |Δ score| vs fp32 |"
            )
            for dtype, values in shape.items():
                print(
                    f"| {dtype} | {values['bytes_per_image'] / 2**20:.2f} | {values['seconds_per_image']:.2f} | "
                    f"{values['rows_read_per_layer_per_run']} | {values['max_abs_diff_vs_fp32']:.1e} |"
                )
        if not args.skip_build:
            builds = build_rss(work, args.build_images, args.build_batch, args.build_world)
            report["build"] = builds
            print(
                f"\nbuilding (4 layers × 28×28×768, N={args.build_images}, fp16, batches of "
                f"{args.build_batch}): peak RSS per process"
            )
            print("| processes | bank (MiB) | baseline RSS (MiB) | peak after pass | peak (MiB) | s |")
            for values in builds:
                for rank, rss in enumerate(values["ranks"]):
                    print(
                        f"| {values['world']} (rank {rank}) | {values['bank_mib']:.0f} | {rss['baseline_mib']:.0f} | "
                        f"{rss['peak_after_pass_mib']:.0f} | {rss['peak_mib']:.0f} | {values['seconds']:.0f} |"
                    )
    print("\n" + report["machine"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
