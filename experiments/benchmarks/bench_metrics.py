"""Time and peak memory of the anomret metrics on one synthetic MVTec-sized category.

The category has 130 images of 518x518 (35M pixels, ~40 normal images), blob-shaped masks with a few
regions each and smooth anomaly maps correlated with them. Each metric runs in a fresh subprocess that
first loads the inputs (and warms up on a tiny case); its extra peak memory is the process's peak RSS
(``ru_maxrss``) after the metric minus the peak RSS after loading. Linux carries a parent's peak RSS into
a forked child, so the driver stays small: it never imports torch and builds the inputs in a subprocess.

    .venv/bin/python experiments/benchmarks/bench_metrics.py            # prints and writes metrics.md
    .venv/bin/python experiments/benchmarks/bench_metrics.py --no-reference --repeats 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import describe_machine  # sibling module: run these scripts as files

N_IMAGES, N_NORMAL, SIZE = 130, 40, 518
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- the inputs
def make_category(seed: int = 0) -> dict[str, Any]:
    """Masks made of 1-4 elliptic blobs per anomalous image; maps = smooth noise + blurred mask."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    masks = np.zeros((N_IMAGES, SIZE, SIZE), dtype=bool)
    for i in range(N_NORMAL, N_IMAGES):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(40, SIZE - 40, size=2)
            ry, rx = rng.uniform(4, 45, size=2)
            angle = rng.uniform(0, np.pi)
            dy, dx = rows - cy, cols - cx
            u = dy * np.cos(angle) + dx * np.sin(angle)
            v = -dy * np.sin(angle) + dx * np.cos(angle)
            masks[i] |= (u / ry) ** 2 + (v / rx) ** 2 <= 1
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(N_IMAGES, 1, 37, 37, generator=generator)
    smooth = F.interpolate(noise, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    blurred = F.avg_pool2d(torch.from_numpy(masks).float().unsqueeze(1), 15, stride=1, padding=7)
    maps = (smooth + 0.8 * blurred + 0.05 * torch.rand(smooth.shape, generator=generator)).squeeze(1)
    labels = masks.reshape(N_IMAGES, -1).any(1)
    scores = maps.flatten(1).topk(SIZE * SIZE // 100, dim=1).values.mean(1)
    scores = scores + 0.05 * torch.randn(N_IMAGES, generator=generator)
    return {"maps": maps.numpy(), "masks": masks, "scores": scores.numpy(), "labels": labels}


# -------------------------------------------------------------------------- what each worker runs
def _tasks() -> dict[str, Callable[[dict[str, Any]], object]]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from anomret.metrics import functional as fn
    from anomret.metrics.evaluator import CategoryEvaluator

    def evaluator_all(d: dict[str, Any]) -> object:
        evaluator = CategoryEvaluator()
        for start in range(0, N_IMAGES, 8):  # batches of 8, as a test loop would
            s = slice(start, start + 8)
            evaluator.update("cat", d["scores"][s], d["labels"][s], d["maps"][s], d["masks"][s])
        return evaluator.compute().per_category["cat"]

    return {
        "image AUROC": lambda d: fn.auroc(d["scores"], d["labels"]),
        "image AP": lambda d: fn.average_precision(d["scores"], d["labels"]),
        "image F1-max": lambda d: fn.f1_max(d["scores"], d["labels"]),
        "pixel AUROC": lambda d: fn.auroc(d["maps"], d["masks"]),
        "pixel AP": lambda d: fn.average_precision(d["maps"], d["masks"]),
        "pixel F1-max": lambda d: fn.f1_max(d["maps"], d["masks"]),
        "pixel AUROC+AP+F1-max (one sort)": lambda d: fn.binary_metrics(d["maps"], d["masks"]),
        "AUPRO exact": lambda d: fn.aupro(d["maps"], d["masks"]),
        "AUPRO 200 thresholds": lambda d: fn.aupro(d["maps"], d["masks"], num_thresholds=200),
        "CategoryEvaluator, 7 metrics (update + compute)": evaluator_all,
        "sklearn roc_auc_score, pixels (reference)": lambda d: roc_auc_score(
            d["masks"].numpy().ravel(), d["maps"].numpy().ravel()
        ),
        "sklearn average_precision_score, pixels (reference)": lambda d: average_precision_score(
            d["masks"].numpy().ravel(), d["maps"].numpy().ravel()
        ),
        LOOP_NAME: lambda d: _per_threshold_loop(d["maps"].numpy(), d["masks"].numpy(), LOOP_THRESHOLDS),
    }


# The per-threshold AUPRO loop as the official MRAD/AnomalyCLIP/RAD code runs it (skimage labelling and
# region coordinates for every threshold). Only its first LOOP_THRESHOLDS of the 200 thresholds are timed;
# the reported time is scaled to 200.
LOOP_THRESHOLDS = 5
LOOP_NAME = "per-threshold AUPRO loop, official-code style (reference; 5 of 200 thresholds timed, x40)"
SCALE = {LOOP_NAME: 200 / LOOP_THRESHOLDS}


def _per_threshold_loop(maps: Any, masks: Any, n_thresholds: int) -> float:
    import numpy as np
    from skimage.measure import label, regionprops

    low, high = maps.min(), maps.max()
    for threshold in np.arange(low, high, (high - low) / 200)[:n_thresholds]:
        predicted = maps > threshold
        overlaps = []
        for prediction, mask in zip(predicted, masks, strict=True):
            for region in regionprops(label(mask)):
                overlaps.append(prediction[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        _ = np.logical_and(~masks, predicted).sum() / (~masks).sum(), np.mean(overlaps)
    return float("nan")  # a partial curve: no value


def _is_reference(name: str) -> bool:
    return "(reference" in name


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(name: str, data_dir: Path, repeats: int) -> dict[str, object]:
    import numpy as np
    import torch

    tasks = _tasks()
    task = tasks[name]
    # Warm-up on a tiny case so lazy imports and first-call allocations do not count.
    tiny = {
        "maps": torch.rand(3, 8, 8),
        "masks": torch.rand(3, 8, 8) > 0.7,
        "scores": torch.rand(3),
        "labels": torch.tensor([False, True, True]),
    }
    task(tiny)
    data = {
        key: torch.from_numpy(np.load(data_dir / f"{key}.npy"))
        for key in ("maps", "masks", "scores", "labels")
    }
    baseline = _peak_mib()
    seconds, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = task(data)
        seconds.append(time.perf_counter() - start)
    return {
        "name": name,
        "seconds": seconds,
        "baseline_mib": baseline,
        "extra_peak_mib": _peak_mib() - baseline,
        "value": value if isinstance(value, (float, dict)) else float(value),
    }


# ---------------------------------------------------------------------------------------- driver
def make_data(data_dir: Path) -> dict[str, str]:
    """Build and save the inputs; describe them and the machine."""
    import numpy as np

    start = time.perf_counter()
    data = make_category()
    for key, array in data.items():
        np.save(data_dir / f"{key}.npy", array)
    masks = data["masks"]
    inputs = (
        f"{N_IMAGES} images of {SIZE}x{SIZE} = {masks.size / 1e6:.1f}M pixels, {N_NORMAL} normal, "
        f"{masks.mean():.2%} anomalous pixels; maps float32 ({data['maps'].nbytes / 2**20:.0f} MiB), "
        f"masks bool ({masks.nbytes / 2**20:.0f} MiB); built in {time.perf_counter() - start:.1f} s"
    )
    return {"inputs": inputs, "machine": describe_machine()}


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def _format_value(value: object) -> str:
    if isinstance(value, float) and value != value:
        return "–"
    if isinstance(value, dict):
        return ", ".join(f"{v:.6f}" for v in value.values())
    return f"{value:.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per metric (the median is reported)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the sklearn reference rows")
    parser.add_argument("--output", type=Path, default=HERE / "metrics.md", help="markdown file to write")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.repeats)))
        return
    if args.make_data:
        print(json.dumps(make_data(args.make_data)))
        return

    names = [n for n in _tasks() if not (args.no_reference and _is_reference(n))]
    with tempfile.TemporaryDirectory() as tmp:
        made = subprocess.run(
            [sys.executable, __file__, "--make-data", tmp], capture_output=True, text=True, check=True
        )
        description = json.loads(made.stdout.strip().splitlines()[-1])
        print(f"inputs: {description['inputs']}", flush=True)
        results = []
        for name in names:
            repeats = args.repeats if not _is_reference(name) else 1
            command = [sys.executable, __file__, "--worker", name, "--data", tmp, "--repeats", str(repeats)]
            completed = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            result["seconds"] = [t * SCALE.get(name, 1.0) for t in result["seconds"]]
            results.append(result)
            print(
                f"  {name}: {statistics.median(result['seconds']):.3f} s, "
                f"+{result['extra_peak_mib']:.0f} MiB over {result['baseline_mib']:.0f} MiB",
                flush=True,
            )

    header = "| metric | time (median) | extra peak RSS (MiB) | value |\n|---|---:|---:|---:|"
    rows = [
        f"| {r['name']} | {_format_seconds(statistics.median(r['seconds']))} | {r['extra_peak_mib']:.0f} | "
        f"{_format_value(r['value'])} |"
        for r in results
    ]
    table = "\n".join([header, *rows])
    print()
    print(table)

    command_line = "`.venv/bin/python experiments/benchmarks/bench_metrics.py" + (
        " " + " ".join(sys.argv[1:]) + "`" if len(sys.argv) > 1 else "`"
    )
    baseline = statistics.median(r["baseline_mib"] for r in results)
    text = f"""# Metric benchmark: one MVTec-sized category

Command (from the repository root): {command_line}
({args.repeats} timed runs per metric, 1 for the sklearn reference rows).

Machine: {description["machine"]}.

Inputs: {description["inputs"]}.

Each row runs in a fresh subprocess. "Extra peak RSS" is that process's peak resident memory after the
metric minus its peak after loading the inputs (median baseline {baseline:.0f} MiB: interpreter, torch,
sklearn and the inputs).

{table}

Notes:
- The exact curves sort the scores of each class separately (a value-only sort) instead of an argsort of
  all pixels; exact AUPRO partitions the normal scores and sorts only those above the FPR limit. Pixel
  metrics therefore need about one extra copy of the maps (the positive and negative scores).
- The "one sort" row is what `CategoryEvaluator` runs for the three pixel metrics together.
- The evaluator row includes storing the maps batch by batch (a float32 copy), concatenating them and all
  seven metrics; its values are image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, exact AUPRO.
- The reference rows are there to check the values (sklearn's are equal) and for scale. The
  per-threshold AUPRO loop of the official MRAD/AnomalyCLIP/RAD code (skimage labelling and region
  coordinates at every threshold) is timed on 5 of its 200 thresholds and scaled by 40. It is a lean
  rewrite; the official code adds full-size temporaries per threshold, so it is slower still.
- This is a shared 2-core virtual machine: repeated runs vary by tens of percent, and the first run of
  each metric pays for page faults on freshly allocated memory.
"""
    args.output.write_text(text)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
