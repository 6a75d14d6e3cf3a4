"""What the ``fast`` precision policy (bf16 encoder) changes in the metrics against ``exact`` (fp32).

Each method runs twice as a user types it, ``precision=exact`` then ``precision=fast``, in fresh working
directories on the built-in synthetic data, with a real-size encoder on random weights (the numbers are
meaningless as detection results; their change is bf16's). Written to ``--out`` (precision.md).

    python experiments/benchmarks/bench_precision.py                      # CPU (bf16 autocast works there)
    python experiments/benchmarks/bench_precision.py --trainer gpu --image-size 448
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine

# (label, overrides of a run); the image size goes to encoder.image_size / resize.
METHODS = {
    "rad": (
        "RAD, DINOv3 ViT-B/16 random weights (4 layers)",
        ["+experiment=demo_rad", "encoder=dinov3_vitb16", "encoder.pretrained=null"],
    ),
    "mrad_tf": (
        "MRAD-TF, CLIP ViT-L/14@336 random weights",
        ["+experiment=demo", "encoder=clip_vit_l14_336", "encoder.pretrained=null"],
    ),
}


def run(workdir: Path, data_dir: str, overrides: list[str]) -> tuple[dict[str, float], float]:
    env = {**os.environ, "ANOMRET_DATA_DIR": data_dir, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomret.train",
            "logger=none",
            "callbacks.overlays.n_per_category=0",
            *overrides,
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{done.args} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    (results,) = (workdir / "logs").rglob("results.json")
    data = json.loads(results.read_text())
    assert data["settings"]["precision"]["policy"] in ("exact", "fast")
    return data["mean"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("precision.md")))
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["rad"])
    parser.add_argument("--trainer", default="cpu", help="trainer group (gpu on a GPU machine)")
    parser.add_argument("--image-size", type=int, default=None, help="default: each demo's own")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluated categories (default: all)")
    args = parser.parse_args()
    device = "cuda" if args.trainer == "gpu" else "cpu"
    extra = [f"trainer={args.trainer}"]
    if args.image_size:
        extra += [f"encoder.image_size={args.image_size}", f"encoder.resize={args.image_size}"]
    if args.categories:
        extra.append(f"dataset.categories=[{','.join(args.categories)}]")
    tables = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data_dir = os.environ.get("ANOMRET_DATA_DIR") or str(scratch / "data")
        for method in args.methods:
            label, overrides = METHODS[method]
            means, seconds = {}, {}
            for policy in ("exact", "fast"):
                workdir = scratch / f"{method}-{policy}"
                workdir.mkdir()
                means[policy], seconds[policy] = run(
                    workdir, data_dir, [*overrides, *extra, f"precision={policy}"]
                )
            tables.append((label, means, seconds))
    lines = [
        "# Precision policies: what `fast` (bf16 encoder) changes against `exact` (fp32)",
        "",
        f"Machine: {describe_machine(device)}.",
        f"Command: `python experiments/benchmarks/bench_precision.py {' '.join(sys.argv[1:])}` (each run as "
        "typed, `precision=exact` then `precision=fast`, synthetic data, random weights).",
        "",
    ]
    for label, means, seconds in tables:
        lines += [
            f"## {label}",
            "",
            f"Overrides: `{' '.join(extra)}`; run time exact {seconds['exact']:.0f} s, fast {seconds['fast']:.0f} s "
            "(with Python start-up and the memory pass).",
            "",
            "| metric | exact | fast | fast − exact |",
            "|---|---:|---:|---:|",
        ]
        for metric, value in means["exact"].items():
            fast = means["fast"].get(metric)
            if value is None or fast is None:
                lines.append(f"| {metric} | – | – | – |")
                continue
            lines.append(f"| {metric} | {value:.6f} | {fast:.6f} | {fast - value:+.6f} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
