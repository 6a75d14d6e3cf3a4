r"""Time of the first and of later MRAD-FT / MRAD-CLIP training epochs, with the feature store.

The encoder is frozen and nothing is augmented, so the first epoch runs the ViT on every auxiliary image
and writes its outputs to the feature store; every later epoch reads them back and only the heads /
prompts compute. The official code re-encodes every epoch (MRAD paper Table 4: 334 s per FT epoch,
353 s per CLIP epoch on an RTX 3090, 7.8 / 9.4 GB).

Two shapes:

- ``--shape demo``: the demo recipes (tiny random CLIP, synthetic data, 42 auxiliary images at 128 px).
  The bank is built first without the store, so epoch 1 starts with an empty store, as the first
  epoch of a run whose bank is already cached does. ``--encoder clip_vit_l14_336`` (or ``clip_vit_b16``)
  swaps in a real-size CLIP with random weights (``--image-size``, ``--categories`` to bound the CPU
  time): the same data and heads, with an encoder whose cost is that of a real run.
- ``--shape paper``: CLIP ViT-L/14@336 with random weights at 518 px, ``--images`` random auxiliary
  images (2,162 = VisA's test split) with random masks, and a random labelled bank of VisA's size
  (2,162 image keys, 3,600 patch prototypes: the retrieval costs the same as with real keys).
  Peak GPU memory is reported per epoch.

    python experiments/benchmarks/bench_mrad_training.py --shape demo --method ft --epochs 3
    python experiments/benchmarks/bench_mrad_training.py --shape demo --method ft --encoder clip_vit_l14_336 \
        --image-size 224 --categories board
    python experiments/benchmarks/bench_mrad_training.py --shape paper --method clip --device cuda

``--no-store`` runs the same epochs without the feature store (nor the in-memory tier): every epoch
encodes its images again, as the official code's do, which is what a later epoch with the store is to be
set against. By default later epochs read the features from the in-memory tier
(:mod:`anomret.features.memory_tier`, device memory first); ``--no-memory`` reads them back from the
store on disk instead, as before the tier.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine

from anomret.assembly import build, build_model
from anomret.banks import get_or_build_bank
from anomret.config import config_dir
from anomret.data.batch import collate_items
from anomret.features.memory_tier import TieredFeatures, feature_memory, namespace
from anomret.features.store import FeatureStore
from anomret.memory.labeled import LabeledMemoryBank


class EpochTimer(lightning.Callback):
    """Wall time, CPU time, images encoded and peak GPU memory of each training epoch.

    CPU time (all threads of this process) is what a CPU run's ratios are read from on a shared machine:
    other jobs stretch the wall time of an epoch, much less the work it does."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def _sync(self, module: lightning.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._sync(module)
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self._encoded = module.extractor.encoded

    def on_train_epoch_end(self, trainer, module) -> None:
        self._sync(module)
        peak = (
            torch.cuda.max_memory_allocated(module.device) / 2**30 if module.device.type == "cuda" else None
        )
        self.epochs.append(
            {
                "epoch": len(self.epochs) + 1,
                "seconds": time.perf_counter() - self._start,
                "cpu_seconds": time.process_time() - self._cpu_start,
                "encoded": module.extractor.encoded - self._encoded,
                "peak_gib": peak,
            }
        )


class RandomAuxiliary(Dataset):
    """Random images with random rectangular masks, in :class:`~anomret.data.dataset.AnomalyDataset`'s item
    layout (stored features replace the image once the feature store has them)."""

    def __init__(self, n: int, size: int, store: FeatureStore | TieredFeatures | None, mean, std) -> None:
        self.n, self.size, self.store = n, size, store
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(index)
        key = f"bench-{self.size}-{index}"
        item: dict[str, Any] = {"feature_key": key}
        held = isinstance(self.store, TieredFeatures) and self.store.holds(key)
        stored = None if self.store is None or held else self.store.read(key)
        if stored is not None:
            item["features"] = stored
        elif not held:  # held features are served by the main process
            item["image"] = (torch.rand(3, self.size, self.size, generator=gen) - self.mean) / self.std
        mask = torch.zeros(self.size, self.size)
        label = index % 2  # VisA's test split is about half anomalous
        if label:
            y, x = torch.randint(0, self.size // 2, (2,), generator=gen).tolist()
            mask[y : y + self.size // 4, x : x + self.size // 4] = 1
        item.update(mask=mask, label=torch.tensor(label), category="bench", image_path=key, index=index)
        return item


def random_bank(encoder, n_images: int, n_patches: int, layer: int) -> LabeledMemoryBank:
    gen = torch.Generator().manual_seed(0)
    return LabeledMemoryBank(
        image_keys=F.normalize(torch.randn(n_images, encoder.cls_dim, generator=gen), dim=-1),
        image_values=F.one_hot(torch.arange(n_images) % 2, 2).float(),
        patch_keys=F.normalize(torch.randn(n_patches, encoder.patch_dim, generator=gen), dim=-1),
        patch_values=F.one_hot((torch.arange(n_patches) % 4 == 0).long(), 2).float(),
        metadata={"build": {"layer": layer}},
    )


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def real_encoder(args: argparse.Namespace) -> list[str]:
    """Overrides that put a real-size CLIP with random weights (and its MRAD settings) into a demo run."""
    overrides = []
    if args.encoder != "tiny_clip":
        overrides += [f"encoder={args.encoder}", "encoder.pretrained=null"]
        if (
            args.encoder == "clip_vit_b16"
        ):  # RAD's settings in that file; MRAD's, as clip_vit_l14_336 has them
            overrides += [
                "encoder.layers=[12]",
                "encoder.vv_blocks=[2,12]",
                "encoder.patch_stream=vv",
                "encoder.keep_text=true",
                "encoder.project_patches=true",
                "encoder.cls_ln_post=false",
                "encoder.neighbor_kernels=[1,3,5]",
                "encoder.pos_embed_interpolation=bilinear",
            ]
        if args.method == "clip":
            overrides.append("model.prompts.deep_layers=8")  # the recipe's, for a 12-block text tower
    if args.image_size is not None:
        overrides += [f"encoder.image_size={args.image_size}", f"encoder.resize={args.image_size}"]
    if args.categories:
        overrides.append(f"aux_dataset.categories=[{','.join(args.categories)}]")
    return overrides


def run_benchmark(args: argparse.Namespace, scratch: Path) -> tuple[list[dict[str, Any]], str]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    common = [
        f"paths.root_dir={scratch}",
        f"paths.output_dir={scratch / 'run'}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={accelerator}",
        "logger=none",
    ]
    if args.method == "clip":
        common.append("model.ft_epochs=1")
    if args.shape == "demo":
        cfg = compose_config([f"+experiment=demo_mrad_{args.method}", *common, *real_encoder(args)])
    else:
        cfg = compose_config(
            [
                f"+experiment=mrad_{args.method}_mvtec",
                "encoder.pretrained=null",
                f"encoder.image_size={args.image_size}",
                f"encoder.resize={args.image_size}",
                *common,
            ]
        )
    lightning.seed_everything(0)
    encoder = build(cfg.encoder)
    model = build_model(cfg, encoder)
    # --no-store: every epoch re-encodes its images, as the official code does (the baseline).
    store = (
        None
        if args.no_store
        else FeatureStore(scratch / "features", encoder.fingerprint(), encoder.preprocess, "fp16")
    )
    memory = None
    if store is not None and not args.no_memory:
        feature_memory().configure("auto", "auto")
        memory = TieredFeatures(feature_memory(), namespace(encoder, store), store)
    source = memory or store
    timer = EpochTimer()
    trainer = lightning.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if args.shape == "demo":
        datamodule = instantiate(cfg.data, _partial_=True)(
            dataset=cfg.dataset,
            aux_dataset=cfg.aux_dataset,
            preprocess=encoder.preprocess,
            feature_store=None,
        )
        datamodule.prepare_data()
        datamodule.setup("fit")
        # The bank first, without the store: epoch 1 then starts with an empty store.
        bank, info = get_or_build_bank(build(cfg.memory), model, datamodule, trainer)
        datamodule.feature_store = source
        loader = datamodule.train_dataloader()
        encoder_name = "tiny random CLIP" if args.encoder == "tiny_clip" else f"{args.encoder} random weights"
        what = (
            f"demo_mrad_{args.method}: {encoder_name}, {len(datamodule.aux_samples)} images at "
            f"{cfg.encoder.image_size} px, bank {bank.summary()}"
        )
    else:
        layer = encoder.layers[-1]
        bank, info = (
            random_bank(encoder, args.images, args.patch_entries, layer),
            {"path": None, "identity": "random"},
        )
        preprocess = encoder.preprocess
        dataset = RandomAuxiliary(args.images, args.image_size, source, preprocess.mean, preprocess.std)
        loader = DataLoader(
            dataset, batch_size=8, shuffle=True, num_workers=args.workers, collate_fn=collate_items
        )
        what = (
            f"mrad_{args.method} paper shape: CLIP ViT-L/14@336 random weights, {args.images} images at "
            f"{args.image_size} px, bank {args.images} image / {args.patch_entries} patch entries"
        )
    model.set_feature_store(store)
    model.extractor.memory = memory
    model.attach_memory(bank, info)
    trainer.fit(model, train_dataloaders=loader)
    return timer.epochs, what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "paper"), default="demo")
    parser.add_argument("--method", choices=("ft", "clip"), default="ft")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=2162)
    parser.add_argument(
        "--encoder",
        choices=("tiny_clip", "clip_vit_b16", "clip_vit_l14_336"),
        default="tiny_clip",
        help="demo shape: the encoder (random weights)",
    )
    parser.add_argument(
        "--categories", nargs="+", default=None, help="demo shape: auxiliary categories (default: all 3)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: 518 at paper shape, the demo's 128 at demo shape",
    )
    parser.add_argument("--patch-entries", type=int, default=3600)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--no-store", action="store_true", help="re-encode every epoch, as the official code (the baseline)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="later epochs read the store on disk, not the in-memory tier"
    )
    args = parser.parse_args()
    if args.shape == "paper" and args.image_size is None:
        args.image_size = 518
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        epochs, what = run_benchmark(args, Path(scratch))
    print(f"{what}\nmachine: {describe_machine(args.device)}\n")
    print("| epoch | seconds | CPU seconds | images encoded | peak GPU GiB |\n|---|---|---|---|---|")
    for epoch in epochs:
        peak = "-" if epoch["peak_gib"] is None else f"{epoch['peak_gib']:.2f}"
        print(
            f"| {epoch['epoch']} | {epoch['seconds']:.2f} | {epoch['cpu_seconds']:.2f} | {epoch['encoded']} "
            f"| {peak} |"
        )
    for measure in ("seconds", "cpu_seconds"):
        later = [e[measure] for e in epochs[1:]]
        if later:
            ratio = epochs[0][measure] / (sum(later) / len(later))
            print(f"epoch 1 / mean of later epochs ({measure.replace('_', ' ')}): {ratio:.1f}x")


if __name__ == "__main__":
    main()
