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
    # ViT-L in bf16 is slow on CPUs without bf16 instructions: the same path on CLIP ViT-B/16 with MRAD's
    # settings (V-V stream in blocks 2-12, projected patches, 1/3/5 neighbour average).
    "mrad_tf_b16": (
        "MRAD-TF, CLIP ViT-B/16 random weights (MRAD's V-V settings)",
        [
            "+experiment=demo",
            "encoder=clip_vit_b16",
            "encoder.pretrained=null",
            "encoder.layers=[12]",
            "encoder.vv_blocks=[2,12]",
            "encoder.patch_stream=vv",
            "encoder.keep_text=true",
            "encoder.project_patches=true",
            "encoder.cls_ln_post=false",
            "encoder.neighbor_kernels=[1,3,5]",
            "encoder.pos_embed_interpolation=bilinear",
        ],
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


def feature_error(
    data_dir: str, overrides: list[str], n_images: int
) -> list[tuple[str, float, float, float]]:
    """Per feature (CLS and each layer's patches) on ``n_images`` test images: the median and largest
    relative L2 error of bf16 autocast against fp32, and the smallest cosine between the two."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from anomret.assembly import build
    from anomret.config import config_dir
    from anomret.data.datamodule import SourceSpec
    from anomret.data.dataset import AnomalyDataset

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.data_dir={data_dir}", *overrides])
    encoder = build(cfg.encoder)
    samples = SourceSpec.from_config(cfg.dataset).load()
    dataset = AnomalyDataset(samples, encoder.preprocess)
    images = torch.stack([dataset[i]["image"] for i in range(min(n_images, len(dataset)))])
    encoder.precision = "fp32"
    exact = encoder(images)
    encoder.precision = "bf16"
    fast = encoder(images)
    pairs = [("CLS", exact.cls, fast.cls)]
    pairs += [
        (f"patches, layer {layer}", exact.patches[layer], fast.patches[layer]) for layer in exact.patches
    ]
    rows = []
    for name, a, b in pairs:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        relative = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
        cosine = F.cosine_similarity(a, b, dim=-1)
        rows.append((name, float(relative.median()), float(relative.max()), float(cosine.min())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("precision.md")))
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["rad"])
    parser.add_argument("--trainer", default="cpu", help="trainer group (gpu on a GPU machine)")
    parser.add_argument("--image-size", type=int, default=None, help="default: each demo's own")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluated categories (default: all)")
    parser.add_argument("--feature-images", type=int, default=8, help="images of the feature comparison")
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
            errors = feature_error(data_dir, [*overrides, *extra], args.feature_images)
            tables.append((label, means, seconds, errors))
    lines = [
        "# Precision policies: what `fast` (bf16 encoder) changes against `exact` (fp32)",
        "",
        f"Machine: {describe_machine(device)}.",
        f"Command: `python experiments/benchmarks/bench_precision.py {' '.join(sys.argv[1:])}` (each run as "
        "typed, `precision=exact` then `precision=fast`, synthetic data, random weights).",
        "",
    ]
    for label, means, seconds, errors in tables:
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
        lines += [
            "",
            f"The encoder's outputs themselves, bf16 autocast against fp32, on {args.feature_images} test images "
            "(every CLS and patch vector):",
            "",
            "| feature | median relative L2 error | largest | smallest cosine |",
            "|---|---:|---:|---:|",
        ]
        for name, median, largest, cosine in errors:
            lines.append(f"| {name} | {median:.2e} | {largest:.2e} | {cosine:.6f} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
