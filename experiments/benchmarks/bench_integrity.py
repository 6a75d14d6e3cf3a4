"""What the checks of stored data cost: feature-store reads, RAD bank loads, and RAD scoring.

Part 1 (feature store): entries of a given shape are written through :class:`FeatureStore` and read back
with the checked reader (key, namespace, dtype, schema, finiteness) and with a plain reader (safetensors
``load_file`` and the float32 cast, the reader before the checks). Reported per entry, warm page cache
and cold (the entry's pages dropped with ``posix_fadvise`` before each read), and the checks alone on
entries already read (the two readers' difference is within the noise of a busy machine).

Part 2 (bank load): a random bank of ``--n-bank`` images with four 28×28×768 layers (DINOv3 ViT-B/16 at
448 px) is written fp16 and int8 and opened memory-mapped; the load is timed whole and with its checks
(records, unit-length global keys, the sampled patch vectors) timed apart, warm and cold.

Part 3 (scoring): the full RAD patch score of ``--images`` test images (global top-K, 4 layers of windowed
1-NN) from that bank, with and without the check each patch row gets when first read; first pass (every
retrieved row is new) and second pass (rows checked already).

    cd experiments/benchmarks
    python bench_integrity.py [--n-bank 160] [--k 150] [--images 2] [--entries 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine  # sibling module: run these scripts as files

LAYERS, GRID, DIM = (3, 6, 9, 11), 28, 768
ENTRY_SHAPES = {
    # demo_rad: tiny_vit at 112 px, blocks 1 and 3
    "tiny_vit 112 px (demo)": {"cls": [64], "patches.1": [14, 14, 64], "patches.3": [14, 14, 64]},
    # RAD: DINOv3 ViT-B/16 at 448 px, blocks 3, 6, 9, 11
    "dinov3_vitb16 448 px (RAD)": {
        "cls": [DIM],
        **{f"patches.{layer}": [GRID, GRID, DIM] for layer in LAYERS},
    },
}


def drop_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (no root needed; other files are untouched)."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def feature_store(work: Path, entries: int, repeats: int) -> dict[str, dict]:
    from safetensors.torch import load_file

    from anomret.encoders.base import Preprocess
    from anomret.features.store import FeatureStore, finite_rows

    out = {}
    for label, shapes in ENTRY_SHAPES.items():
        store = FeatureStore(work / "store", {"name": label}, Preprocess(448, 448, (0.5,) * 3, (0.5,) * 3))
        keys = [f"{i:032x}" for i in range(entries)]
        generator = torch.Generator().manual_seed(0)
        for key in keys:
            store.write(
                key, {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
            )
        paths = [store.path(key) for key in keys]

        def plain(cold: bool, paths=paths) -> None:
            for path in paths:
                if cold:
                    drop_cache(path)
                {name: tensor.float() for name, tensor in load_file(str(path)).items()}

        def checked(cold: bool, paths=paths, keys=keys, store=store) -> None:
            for key, path in zip(keys, paths, strict=True):
                if cold:
                    drop_cache(path)
                assert store.read(key) is not None

        loaded = [load_file(str(path)) for path in paths]
        key, metadata = keys[0], {"key": keys[0], "namespace": store.namespace}

        def checks_alone(loaded=loaded, store=store, key=key, metadata=metadata) -> None:
            for tensors in loaded:  # what the checked reader adds to a plain one
                assert not store._problem(key, metadata, tensors)
                assert all(finite_rows(tensor.reshape(1, -1)).all() for tensor in tensors.values())

        row = {"entry_bytes": paths[0].stat().st_size}
        row["checks_alone_ms"] = best(checks_alone, repeats) / entries * 1e3
        for cache in ("warm", "cold"):
            cold = cache == "cold"
            plain(False), checked(False)  # page in (warm) and load the schema once
            row[f"plain_ms_{cache}"] = best(lambda cold=cold: plain(cold), repeats) / entries * 1e3
            row[f"checked_ms_{cache}"] = best(lambda cold=cold: checked(cold), repeats) / entries * 1e3
        out[label] = row
    return out


def random_bank(path: Path, n_bank: int, dtype: str) -> Path:
    from anomret.encoders.base import Features
    from anomret.memory.normal_builder import NormalBankBuilder

    builder = NormalBankBuilder(LAYERS, dtype, beside=path)
    generator = torch.Generator().manual_seed(1)
    base = {layer: torch.randn(GRID, GRID, DIM, generator=generator) for layer in LAYERS}
    for start in range(0, n_bank, 16):
        n = min(16, n_bank - start)
        features = Features(
            cls=torch.randn(n, DIM, generator=generator),
            patches={
                layer: base[layer] + 0.8 * torch.randn(n, GRID, GRID, DIM, generator=generator)
                for layer in LAYERS
            },
        )
        builder.add(features, {"index": torch.arange(start, start + n)})
    images = [[f"/img/{i}.png", "c", 0, [f"/img/{i}.png", 1, 1], None] for i in range(n_bank)]
    builder.build({"build": {"layers": list(LAYERS), "dtype": dtype}, "images": images}).save(path)
    builder.close()
    return path


@contextmanager
def without_load_checks():
    from anomret.memory import normal_bank
    from anomret.memory.rows import PatchRows

    saved = normal_bank.check_records, PatchRows.check_sample, normal_bank.unit_vectors
    normal_bank.check_records = lambda *args: None
    PatchRows.check_sample = lambda self: None
    normal_bank.unit_vectors = lambda values: np.ones(values.shape[:-1], dtype=bool)
    try:
        yield
    finally:
        normal_bank.check_records, PatchRows.check_sample, normal_bank.unit_vectors = saved


def bank_load(path: Path, repeats: int) -> dict[str, float]:
    from anomret.memory.normal_bank import NormalMemoryBank, check_records
    from anomret.memory.rows import unit_vectors

    row: dict[str, float] = {"bank_mib": path.stat().st_size / 2**20}
    for cache in ("warm", "cold"):
        cold = cache == "cold"

        def load(cold: bool = cold) -> NormalMemoryBank:
            if cold:
                drop_cache(path)
            return NormalMemoryBank.load(path)

        bank = load()
        row[f"load_ms_{cache}"] = best(load, repeats) * 1e3
        with without_load_checks():
            row[f"load_unchecked_ms_{cache}"] = best(load, repeats) * 1e3

        def sample(cold: bool = cold, bank: NormalMemoryBank = bank) -> None:
            if cold:
                drop_cache(path)
            for rows in bank.patches.values():
                rows.check_sample()

        row[f"sample_check_ms_{cache}"] = best(sample, repeats) * 1e3
    row["records_and_cls_check_ms"] = (
        best(lambda: (check_records(path, bank.category, bank.metadata), unit_vectors(bank.cls)), repeats)
        * 1e3
    )
    return row


def scoring(path: Path, k: int, images: int) -> dict[str, float]:
    from anomret.encoders.base import Features
    from anomret.memory.normal_bank import NormalMemoryBank
    from anomret.memory.rows import PatchRows
    from anomret.retrieval.spatial import SpatialRetrieval

    generator = torch.Generator().manual_seed(2)
    queries = Features(
        cls=torch.randn(images, DIM, generator=generator),
        patches={layer: torch.randn(images, GRID, GRID, DIM, generator=generator) for layer in LAYERS},
    )
    retrieval = SpatialRetrieval(k=k, rho=1)

    def score(bank: NormalMemoryBank) -> float:
        start = time.perf_counter()
        neighbors = retrieval.neighbors(queries.cls, bank.cls)
        retrieval.scores(
            queries.patches, {layer: rows.stored() for layer, rows in bank.patches.items()}, neighbors
        )
        return (time.perf_counter() - start) / images

    row = {}
    saved = PatchRows.check_first_read
    NormalMemoryBank.load(path)  # page the bank in: both variants read it warm
    for variant in ("unchecked", "checked"):
        if variant == "unchecked":
            PatchRows.check_first_read = lambda self, index, values, scales=None: None
        try:
            bank = NormalMemoryBank.load(path)
            row[f"{variant}_first_s_per_image"] = score(bank)
            row[f"{variant}_again_s_per_image"] = score(bank)
        finally:
            PatchRows.check_first_read = saved
    rows = bank.patches[LAYERS[0]]
    row["rows_checked_per_layer"] = int(rows._checked.sum()) if rows._checked is not None else 0

    index = torch.arange(min(k, len(rows)))
    taken = {layer: layer_rows._take(layer_rows.values, index) for layer, layer_rows in bank.patches.items()}
    read_time = best(
        lambda: [layer_rows._take(layer_rows.values, index) for layer_rows in bank.patches.values()], 3
    )

    def check_rows() -> None:
        for layer, layer_rows in bank.patches.items():
            layer_rows._checked = None
            layer_rows.check_first_read(index, taken[layer])

    row["check_ms_per_row_all_layers"] = best(check_rows, 3) / len(index) * 1e3
    row["read_ms_per_row_all_layers"] = read_time / len(index) * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-bank", type=int, default=160)
    parser.add_argument("--k", type=int, default=150)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--entries", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results: dict = {"machine": describe_machine()}
    print(results["machine"])
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
        work = Path(directory)
        results["feature_store"] = feature_store(work, args.entries, args.repeats)
        print(json.dumps(results["feature_store"], indent=2))
        results["bank_load"], results["scoring"] = {}, {}
        for dtype in ("fp16", "int8"):
            path = random_bank(work / f"bank_{dtype}.safetensors", args.n_bank, dtype)
            results["bank_load"][dtype] = bank_load(path, args.repeats)
            print(dtype, json.dumps(results["bank_load"][dtype], indent=2))
            results["scoring"][dtype] = scoring(path, args.k, args.images)
            print(dtype, json.dumps(results["scoring"][dtype], indent=2))
            path.unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
