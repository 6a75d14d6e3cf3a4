r"""The GPU benchmark in one command, within five minutes on one H200: what anomret costs at the papers'
shapes against the official code's loops, on random weights of the real model sizes.

Steps, most important first (each in its own process, bounded by a timeout, its log and results written
under ``--out`` as it goes, so what finished is kept when a later step runs out of time):

1. ``rad``: RAD's test phase end to end (DINOv3 ViT-B/16 at 448, 4 layers, fp16 bank, Lightning's test
   loop with maps and metrics) at K 150 / ρ 1 and K 900 / ρ 2, the bank placed on the device
   (``memory.placement=auto``) and, at K 150, streamed from the host (``stream``); per image against the
   encoder's own time and against the official per-position loop (timed on a share of the positions of
   one image and layer, scaled to 784 positions × 4 layers, plus the encoder).
2. ``mrad_tf``: MRAD-TF scoring at the paper's shape (CLIP ViT-L/14@336 at 518, VisA-sized bank) under
   each precision policy (exact fp32, tf32, fast bf16), batch 1 and 16, against a transcription of the
   official batch-1 test loop (fp32, scipy blur on the host) on the same weights; max |Δ| of the image
   scores of exact against that loop.
3. ``ft`` / ``clip``: MRAD-FT (512 images) and MRAD-CLIP (256 images) paper-shape epochs: the first
   encodes, the second reads the in-memory feature tier; peak GPU memory per epoch.
4. ``kernel``: ``bench_spatial.py`` (the windowed kernel, the torch path and the loop; one layer).

    python experiments/benchmarks/bench_gpu.py                      # GPU, paper shapes, --out $OUT or here
    python experiments/benchmarks/bench_gpu.py --device cpu --shape reduced --out /tmp/bench   # the CI check

Offline machines: the steps need hydra-core, omegaconf, antlr4-python3-runtime (and open_clip_torch, ftfy,
wcwidth for the CLIP steps) besides torch, lightning, timm and triton; bring them as wheels (see the
benchmark README section, ``make bench-gpu``). The report goes to ``--out``/gpu.md (default ``$OUT`` when
set, else ``experiments/benchmarks/``), each step's results and log to ``--work`` (default
``$OUT/bench_gpu`` or a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STEPS = ("rad", "mrad_tf", "ft", "clip", "kernel")
# Seconds each step may take (the whole run is also bounded by --budget).
TIMEOUTS = {"rad": 150, "mrad_tf": 120, "ft": 100, "clip": 100, "kernel": 90}
GOALS = {
    "rad_vs_encoder_k150": 2.0,
    "rad_vs_encoder_k900": 4.0,
    "rad_vs_loop": 30.0,
    "ft_later": 30.0,
    "clip_later": 10.0,
}


# Packages beyond torch, lightning and timm, and the steps that need them (all steps by default).
NEEDED_BY = {
    "hydra": STEPS,
    "omegaconf": STEPS,
    "open_clip": ("mrad_tf", "ft", "clip"),
    "scipy": ("mrad_tf",),
}


def preflight() -> list[str]:
    """The packages this machine lacks, said once with the way to bring them."""
    import importlib.util

    missing = [name for name in NEEDED_BY if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)}. On a machine without network: fetch the wheels where pip works "
            "(experiments/benchmarks/gpu_wheels.sh), then `python3 -m pip install --no-index --no-deps "
            "--target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site:$PWD/src",
            flush=True,
        )
    return missing


# ------------------------------------------------------------------------------------------- shapes
def shapes(shape: str) -> dict[str, Any]:
    if shape == "paper":
        return {
            "rad_experiment": "rad_mvtec",
            "rad_overrides": [],
            "rad_bank": 1000,
            "rad_images": 64,
            "rad_batch": 8,
            "rad_configs": [(150, 1, "auto"), (900, 2, "auto"), (150, 1, "stream")],
            "loop_positions": 196,
            "mrad_experiment": "mrad_tf_mvtec",
            "mrad_bank": (2162, 3600),
            "mrad_batches": (1, 16),
            "mrad_images": 32,
            "official_images": 8,
            "ft": ["--shape", "paper", "--method", "ft", "--images", "512", "--epochs", "2"],
            "clip": ["--shape", "paper", "--method", "clip", "--images", "256", "--epochs", "2"],
            "kernel": [
                "--configs",
                "150:1",
                "900:2",
                "--batch",
                "8",
                "--loop-positions",
                "98",
                "--repeats",
                "1",
            ],
        }
    return {  # CPU, reduced: every step runs, in seconds
        "rad_experiment": "demo_rad",
        "rad_overrides": [],
        "rad_bank": 24,
        "rad_images": 8,
        "rad_batch": 4,
        "rad_configs": [(4, 1, "auto"), (12, 2, "auto"), (4, 1, "stream")],
        "loop_positions": 28,
        "mrad_experiment": "demo",
        "mrad_bank": (64, 128),
        "mrad_batches": (1, 4),
        "mrad_images": 4,
        "official_images": 2,
        "ft": ["--shape", "demo", "--method", "ft", "--epochs", "2", "--categories", "board"],
        "clip": ["--shape", "demo", "--method", "clip", "--epochs", "2", "--categories", "board"],
        "kernel": ["--grid", "8", "--dim", "64", "--configs", "30:1", "--batch", "2", "--repeats", "1"],
    }


# ------------------------------------------------------------------------------------------ helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from anomret.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def _timed(fn, device, runs: int) -> float:
    """Best wall time of ``runs`` calls of ``fn`` after one untimed call."""
    fn()
    best = math.inf
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class RandomTestImages:
    """Random normalised images with random masks, in AnomalyDataset's item layout (half anomalous)."""

    def __init__(self, n: int, side: int, mask_size: int) -> None:
        self.n, self.side, self.mask_size = n, side, mask_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        gen = torch.Generator().manual_seed(index)
        mask = torch.zeros(self.mask_size, self.mask_size)
        label = index % 2
        if label:
            y, x = torch.randint(0, self.mask_size // 2, (2,), generator=gen).tolist()
            mask[y : y + self.mask_size // 4, x : x + self.mask_size // 4] = 1
        return {
            "image": torch.randn(3, self.side, self.side, generator=gen),
            "mask": mask,
            "label": torch.tensor(label),
            "category": f"c{index // 2 % 2}",  # two categories, each with both labels
            "image_path": f"bench/{index}.png",
            "index": index,
        }


# --------------------------------------------------------------------------------------------- RAD
def official_rad_loop(query, rows, rho: int, positions: list[int]):
    """The official per-position loop for one image and one layer (``eval_patch_knn_multilayer_cluster``):
    gather the K neighbour grids, normalise, then per position build the window's indices, gather, matmul,
    max. ``rows``: the K stored grids ``[K, h, w, D]`` on the device."""
    import torch
    import torch.nn.functional as F

    _, h, w, dim = query.shape
    ref = F.normalize(rows.float().reshape(rows.shape[0], h * w, dim), dim=-1)
    q = F.normalize(query[0].reshape(h * w, dim).float(), dim=-1)
    scores = []
    for j in positions:
        r, c = divmod(j, w)
        window = [
            rr * w + cc
            for rr in range(max(0, r - rho), min(h, r + rho + 1))
            for cc in range(max(0, c - rho), min(w, c + rho + 1))
        ]
        index = torch.tensor(window, device=query.device)
        candidates = ref[:, index, :].reshape(-1, dim)
        scores.append(1 - (q[j : j + 1] @ candidates.T).max())
    return torch.stack(scores)


def step_rad(args: argparse.Namespace, shape: dict[str, Any]) -> dict[str, Any]:
    import lightning
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from anomret.assembly import build, build_model
    from anomret.data.batch import collate_items
    from anomret.memory.normal_bank import NormalMemoryBank
    from anomret.memory.placement import RowPlacement
    from anomret.memory.rows import PatchRows
    from anomret.precision import PrecisionPolicy

    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    base = [
        f"+experiment={shape['rad_experiment']}",
        "encoder.pretrained=null",
        f"precision={args.precision}",
    ]
    cfg = _compose([*base, *shape["rad_overrides"]])
    PrecisionPolicy.from_config(cfg.precision_policy).apply()
    encoder = build(cfg.encoder)
    layers, side, grid = list(encoder.layers), encoder.image_size, encoder.grid_size
    n_bank, dim = shape["rad_bank"], encoder.patch_dim

    # A random fp16 bank of n_bank images in RAM (as memory.mmap=false loads one): made on the device.
    gen = torch.Generator(device).manual_seed(0)
    patches = {}
    for layer in layers:
        rows = torch.empty(n_bank, grid, grid, dim, dtype=torch.float16)
        for start in range(0, n_bank, 64):
            piece = rows[start : start + 64]
            piece.copy_(torch.randn(piece.shape, generator=gen, device=device).half().cpu())
        patches[layer] = PatchRows(rows)
    cls = F.normalize(torch.randn(n_bank, encoder.cls_dim, generator=gen, device=device), dim=-1).cpu()
    metadata = {"categories": ["bench"], "build": {"layers": layers, "dtype": "fp16"}}

    dataset = RandomTestImages(shape["rad_images"], side, int(cfg.model.map.size))
    loader_args = {"batch_size": shape["rad_batch"], "collate_fn": collate_items}
    if device.type == "cuda":
        loader_args.update(num_workers=4, pin_memory=True)

    # The encoder's own time, per image, on batches of the test batch size.
    encoder.to(device)
    images = torch.randn(shape["rad_batch"], 3, side, side, device=device)
    encoder_s = _timed(lambda: encoder(images), device, 5) / shape["rad_batch"]
    encoder_one_s = _timed(lambda: encoder(images[:1]), device, 5)

    runs = []
    for k, rho, placement in shape["rad_configs"]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_cfg = _compose([*base, *shape["rad_overrides"], f"retrieval.k={k}", f"retrieval.rho={rho}"])
        model = build_model(run_cfg, encoder)
        bank = NormalMemoryBank(cls.clone(), torch.zeros(n_bank, dtype=torch.long), patches, metadata)
        bank.placement = RowPlacement(placement)
        model.attach_memory(bank, {"path": None, "kind": "normal", "identity": "random"})
        clock = BatchClock()
        trainer = lightning.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=False,
            callbacks=[clock],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.test(model, dataloaders=DataLoader(dataset, **loader_args), verbose=False)
        per_image = clock.steady_seconds_per_image()

        # The official loop on one image and one layer, on a share of the positions, scaled up.
        features = encoder(images[:1])
        neighbors = model.retriever.neighbors(features.cls, bank.cls.to(device))[0]
        layer = layers[-1]
        rows = patches[layer].values[neighbors.cpu()].to(device)
        positions = list(range(0, grid * grid, max(1, grid * grid // shape["loop_positions"])))
        query = features.patches[layer]
        loop_s = _timed(lambda q=query, r=rows, p=positions, w=rho: official_rad_loop(q, r, w, p), device, 1)
        loop_per_image = loop_s * (grid * grid) / len(positions) * len(layers) + encoder_s
        runs.append(
            {
                "k": k,
                "rho": rho,
                "placement": model.bank.placed.mode,
                "images": len(dataset),
                "test_ms_per_image": per_image * 1e3,
                "test_phase_s": clock.phase_seconds(),
                "encoder_ms_per_image": encoder_s * 1e3,
                "test_vs_encoder": per_image / encoder_s,
                "official_ms_per_image": loop_per_image * 1e3,
                "speedup_vs_official": loop_per_image / per_image,
                "loop_positions_timed": len(positions),
                "peak_gib": _peak_gib(device),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    return {
        "what": (
            f"{cfg.encoder.name} random weights at {side} px, layers {layers}, {grid}x{grid} grids, "
            f"bank of {n_bank} images (fp16, in RAM), {len(dataset)} test images in batches of "
            f"{shape['rad_batch']}, precision={args.precision}"
        ),
        "encoder_ms_batch1": encoder_one_s * 1e3,
        "runs": runs,
    }


class BatchClock:
    """Times of a test pass: per batch (synchronised), and the whole phase."""

    def __new__(cls, *args: Any, **kwargs: Any):  # a Lightning callback, built when lightning is imported
        import lightning

        class _Clock(lightning.Callback):
            def __init__(self) -> None:
                self.marks: list[float] = []
                self.sizes: list[int] = []

            def on_test_start(self, trainer, module) -> None:
                _sync(module.device)
                self.start = time.perf_counter()

            def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
                _sync(module.device)
                self.marks.append(time.perf_counter())
                self.sizes.append(len(batch))

            def on_test_end(self, trainer, module) -> None:
                _sync(module.device)
                self.end = time.perf_counter()

            def steady_seconds_per_image(self) -> float:
                """From the end of the first batch (compilation, placement) to the end of the last."""
                if len(self.marks) < 2:
                    return (self.marks[0] - self.start) / self.sizes[0]
                return (self.marks[-1] - self.marks[0]) / sum(self.sizes[1:])

            def phase_seconds(self) -> float:
                return self.end - self.start

        return _Clock()


# ----------------------------------------------------------------------------------------- MRAD-TF
def official_mrad_tf(model, images, sigma: float, weight: float, top_ratio: float) -> list[float]:
    """The official MRAD-TF test loop (batch 1, fp32): retrieval on the device, the map blurred on the host
    with scipy, the top 1 % mean in numpy; returns the image scores."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    bank = model.bank
    encoder = model.encoder
    layer = encoder.layers[-1]
    patch_keys = F.normalize(bank.patch_keys.float(), dim=-1)
    image_keys = F.normalize(bank.image_keys.float(), dim=-1)
    scores = []
    for image in images:
        with torch.no_grad():
            features = encoder(image[None])
            grid = features.patches[layer][0]
            side = grid.shape[0]
            q = F.normalize(grid.reshape(-1, grid.shape[-1]), dim=-1)
            p = torch.softmax(q @ patch_keys.T, dim=-1) @ bank.patch_values.float()
            amap = p.reshape(1, side, side, 2).permute(0, 3, 1, 2)
            amap = F.interpolate(amap, size=encoder.image_size, mode="bilinear", align_corners=False)[:, 1]
            amap = gaussian_filter(amap.cpu().numpy(), sigma=(0, sigma, sigma))
            k = int(top_ratio * amap[0].size)
            m = float(np.sort(amap[0].ravel())[-k:].mean())
            a = F.normalize(features.cls, dim=-1)
            r = float((torch.softmax(a @ image_keys.T, dim=-1) @ bank.image_values.float())[0, 1])
        scores.append(weight * r + (1 - weight) * m)
    return scores


def step_mrad_tf(args: argparse.Namespace, shape: dict[str, Any]) -> dict[str, Any]:
    import torch
    from bench_mrad_training import random_bank

    from anomret.assembly import build, build_model
    from anomret.data.batch import Batch
    from anomret.precision import PrecisionPolicy

    device = torch.device(args.device)
    cfg = _compose([f"+experiment={shape['mrad_experiment']}", "encoder.pretrained=null"])
    encoder = build(cfg.encoder)
    model = build_model(cfg, encoder)
    n_images, n_patches = shape["mrad_bank"]
    model.attach_memory(random_bank(encoder, n_images, n_patches, encoder.layers[-1]), {"path": None})
    model.to(device)
    model._bank_to_device()
    side = encoder.image_size
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randn(shape["mrad_images"], 3, side, side, generator=gen, device=device)

    policies = {"exact": ("fp32", "highest"), "tf32": ("tf32", "high"), "fast": ("bf16", "high")}
    if device.type != "cuda":
        policies.pop("tf32")  # the same arithmetic as fp32 on a CPU
    rows = []
    exact_scores = None
    for name, (arithmetic, matmul) in policies.items():
        PrecisionPolicy(name, arithmetic, matmul).apply()
        encoder.precision = arithmetic
        for batch in shape["mrad_batches"]:
            chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]

            def score_all(chunks=chunks):
                return [model(Batch.unlabelled(torch.arange(len(c)), image=c)).image_score for c in chunks]

            with torch.no_grad():
                seconds = _timed(score_all, device, 2)
                if name == "exact" and batch == 1:
                    exact_scores = torch.cat(score_all()).cpu()
            rows.append(
                {"policy": name, "batch": batch, "ms_per_image": seconds / (len(chunks) * batch) * 1e3}
            )
            print(json.dumps(rows[-1]), flush=True)
    PrecisionPolicy().apply()
    encoder.precision = "fp32"
    n_official = shape["official_images"]
    official = official_mrad_tf(
        model, images[:n_official], cfg.model.map.sigma, cfg.model.score.retrieval_weight, 0.01
    )
    official_s = _timed(
        lambda: official_mrad_tf(
            model, images[:n_official], cfg.model.map.sigma, cfg.model.score.retrieval_weight, 0.01
        ),
        device,
        1,
    )
    official_ms = official_s / n_official * 1e3
    for row in rows:
        row["speedup_vs_official"] = official_ms / row["ms_per_image"]
    delta = float((exact_scores[:n_official] - torch.tensor(official)).abs().max())
    return {
        "what": (
            f"{cfg.encoder.name} random weights at {side} px, bank of {n_images} image and {n_patches} "
            f"patch entries, {len(images)} random images"
        ),
        "official_ms_per_image": official_ms,
        "exact_vs_official_max_abs_diff": delta,
        "runs": rows,
    }


# -------------------------------------------------------------------------------------- FT, CLIP
def step_training(args: argparse.Namespace, shape: dict[str, Any], method: str) -> dict[str, Any]:
    import tempfile

    import bench_mrad_training

    parser = argparse.ArgumentParser()
    for flag, default in (("--shape", "demo"), ("--method", "ft"), ("--device", "cpu")):
        parser.add_argument(flag, default=default)
    for flag, default in (("--epochs", 2), ("--images", 2162), ("--patch-entries", 3600), ("--workers", 4)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--encoder", default="tiny_clip")
    parser.add_argument("--categories", nargs="+", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-store", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    bench_args = parser.parse_args([*shape[method], "--device", args.device])
    if bench_args.shape == "paper" and bench_args.image_size is None:
        bench_args.image_size = 518
    with tempfile.TemporaryDirectory() as scratch:
        epochs, what = bench_mrad_training.run_benchmark(bench_args, Path(scratch))
    first, later = epochs[0]["seconds"], [e["seconds"] for e in epochs[1:]]
    return {
        "what": what,
        "epochs": epochs,
        "later_speedup": first / (sum(later) / len(later)) if later else None,
    }


def step_kernel(args: argparse.Namespace, shape: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "bench_spatial.py"), "--device", args.device, *shape["kernel"]]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return {"table": done.stdout}


# ------------------------------------------------------------------------------------------ report
def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def report(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> str:
    goals_apply = meta["shape"] == "paper"  # reduced shapes only show that every step runs

    def _goal(value: float | None, goal: float, at_most: bool) -> str:
        if value is None or not goals_apply:
            return "–"
        met = value <= goal if at_most else value >= goal
        return f"{'met' if met else 'missed'} ({'≤' if at_most else '≥'} {goal:g}×)"

    lines = [
        "# anomret on a GPU: RAD, MRAD-TF and the MRAD training epochs at the papers' shapes",
        "",
        f"Machine: {meta['machine']}.",
        f"Command: `python experiments/benchmarks/bench_gpu.py {' '.join(meta['argv'])}` "
        f"({meta['elapsed']:.0f} s in all; random weights, synthetic inputs).",
        "",
    ]
    if not goals_apply:
        lines += [
            "Reduced shapes (tiny encoders, small banks): the figures only show that every step runs; the goals "
            "are for the papers' shapes on a GPU.",
            "",
        ]
    rad = results.get("rad")
    lines += ["## 1. RAD test phase end to end", ""]
    if isinstance(rad, dict) and "runs" in rad:
        lines += [
            rad["what"] + ".",
            "",
            "| K | ρ | rows | ms / image (test phase) | encoder ms / image | test / encoder | goal | "
            "official loop ms / image | speed-up | goal | test phase s | peak GPU GiB |",
            "|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|---:|",
        ]
        for run in rad["runs"]:
            goal = GOALS["rad_vs_encoder_k150"] if run["k"] <= 150 else GOALS["rad_vs_encoder_k900"]
            lines.append(
                f"| {run['k']} | {run['rho']} | {run['placement']} | {_ms(run['test_ms_per_image'])} | "
                f"{_ms(run['encoder_ms_per_image'])} | {run['test_vs_encoder']:.2f}× | "
                f"{_goal(run['test_vs_encoder'], goal, True)} | {_ms(run['official_ms_per_image'])} | "
                f"{run['speedup_vs_official']:.1f}× | {_goal(run['speedup_vs_official'], GOALS['rad_vs_loop'], False)} "
                f"| {run['test_phase_s']:.1f} | {_ms(run['peak_gib'])} |"
            )
        lines += [
            "",
            "ms / image: the test loop from the end of its first batch to the end of the last (Lightning's loop "
            "with data, encoder, retrieval, maps and the evaluator's per-batch work), over the images after the "
            "first batch; test phase s: the whole `trainer.test`, with placing the bank and the metrics. The "
            f"official loop is timed on {rad['runs'][0]['loop_positions_timed']} positions of one image and one "
            "layer, scaled to every position and layer, plus the encoder's time per image.",
            "",
        ]
    else:
        lines += [f"Not measured: {rad}" if rad else "Not run.", ""]
    mrad = results.get("mrad_tf")
    lines += ["## 2. MRAD-TF scoring", ""]
    if isinstance(mrad, dict) and "runs" in mrad:
        lines += [
            mrad["what"]
            + f". Official batch-1 loop (fp32): {_ms(mrad['official_ms_per_image'])} ms / image; "
            f"max |Δ| of the image scores (exact, batch 1) against it: {mrad['exact_vs_official_max_abs_diff']:.1e}.",
            "",
            "| precision policy | batch | ms / image | speed-up vs official loop |",
            "|---|---:|---:|---:|",
        ]
        for run in mrad["runs"]:
            lines.append(
                f"| {run['policy']} | {run['batch']} | {_ms(run['ms_per_image'])} | {run['speedup_vs_official']:.1f}× |"
            )
        lines.append("")
    else:
        lines += [f"Not measured: {mrad}" if mrad else "Not run.", ""]
    lines += ["## 3. MRAD-FT / MRAD-CLIP epochs", ""]
    for method, goal in (("ft", GOALS["ft_later"]), ("clip", GOALS["clip_later"])):
        result = results.get(method)
        if not (isinstance(result, dict) and "epochs" in result):
            lines += [f"{method}: " + (f"not measured: {result}" if result else "not run."), ""]
            continue
        lines += [
            f"{result['what']}.",
            "",
            "| epoch | seconds | images encoded | peak GPU GiB |",
            "|---:|---:|---:|---:|",
        ]
        for epoch in result["epochs"]:
            lines.append(
                f"| {epoch['epoch']} | {epoch['seconds']:.2f} | {epoch['encoded']} | {_ms(epoch['peak_gib'])} |"
            )
        speedup = result["later_speedup"]
        lines += [
            "",
            f"Epoch 1 / later epochs: {'–' if speedup is None else f'{speedup:.1f}×'} "
            f"({_goal(speedup, goal, False)}).",
            "",
        ]
    kernel = results.get("kernel")
    lines += ["## 4. The windowed kernel (`bench_spatial.py`)", ""]
    if isinstance(kernel, dict) and "table" in kernel:
        lines += ["```", kernel["table"].strip(), "```", ""]
    else:
        lines += [f"Not measured: {kernel}" if kernel else "Not run.", ""]
    text = "\n".join(lines)
    (out / "gpu.md").write_text(text)
    return text


# -------------------------------------------------------------------------------------------- main
def run_step(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    shape = shapes(args.shape)
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    name = args.run_step
    if name == "rad":
        result = step_rad(args, shape)
    elif name == "mrad_tf":
        result = step_mrad_tf(args, shape)
    elif name in ("ft", "clip"):
        result = step_training(args, shape, name)
    else:
        result = step_kernel(args, shape)
    Path(args.result).write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=("paper", "reduced"), default=None, help="default: paper on cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE), help="where gpu.md goes")
    parser.add_argument("--work", default=None, help="each step's results and log")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for all steps together")
    parser.add_argument("--precision", default="exact", help="RAD's precision policy (exact, tf32, fast)")
    parser.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("paper" if args.device == "cuda" else "reduced")
    if args.run_step:
        run_step(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(
        args.work or (Path(os.environ["OUT"]) / "bench_gpu" if os.environ.get("OUT") else tempfile.mkdtemp())
    )
    (work / "logs").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from machine import describe_machine

    missing = preflight()
    start = time.perf_counter()
    meta = {
        "machine": describe_machine(args.device),
        "argv": sys.argv[1:],
        "elapsed": 0.0,
        "shape": args.shape,
    }
    results: dict[str, Any] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in args.steps:
        needs = [package for package in missing if name in NEEDED_BY.get(package, STEPS)]
        if needs:
            results[name] = f"skipped: {', '.join(needs)} not installed (see the module docstring)"
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            results[name] = f"skipped: the {args.budget:.0f} s budget was spent"
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--result"]
        command += [str(work / f"{name}.json"), "--device", args.device, "--shape", args.shape]
        command += ["--precision", args.precision]
        log_path = work / "logs" / f"{name}.log"
        began = time.perf_counter()
        with log_path.open("w") as log:
            try:
                done = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=min(TIMEOUTS[name], left)
                )
                failed = done.returncode != 0
                outcome = f"exit status {done.returncode}, see {log_path}" if failed else None
            except subprocess.TimeoutExpired:
                outcome = f"timed out after {min(TIMEOUTS[name], left):.0f} s, see {log_path}"
        took = time.perf_counter() - began
        if outcome is None:
            results[name] = json.loads((work / f"{name}.json").read_text())
            print(f"{name}: done in {took:.0f} s", flush=True)
        else:
            results[name] = outcome
            print(f"{name}: {outcome}", flush=True)
        meta["elapsed"] = time.perf_counter() - start
        report(out, results, meta)  # after every step: what finished is kept
    print(report(out, results, meta))


if __name__ == "__main__":
    main()
