"""RAD's scores against a literal, hand-written reference, and its normal-image memory."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import anomret
from anomret.data.batch import Batch
from anomret.data.samples import Sample, SampleTable
from anomret.encoders.base import Features
from anomret.encoders.timm_vit import TimmViTEncoder
from anomret.maps import AnomalyMapper
from anomret.memory.fewshot import select_images
from anomret.memory.normal import NormalMemorySettings
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.normal_builder import NormalBankBuilder
from anomret.memory.rows import PatchRows, quantize_int8
from anomret.memory.spill import SpillInfo
from anomret.memory.store import BankError
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.models.rad import RAD
from anomret.retrieval.spatial import SpatialRetrieval

LAYERS = (1, 3)
DIM = 16
GRID = 4


def tiny_encoder() -> TimmViTEncoder:
    return TimmViTEncoder(
        "vit_tiny_patch16_224",
        layers=list(LAYERS),
        image_size=32,
        name="tiny",
        model_kwargs={"patch_size": 8, "embed_dim": DIM, "depth": 4, "num_heads": 2},
    )


def random_features(batch: int, seed: int) -> Features:
    gen = torch.Generator().manual_seed(seed)
    return Features(
        cls=torch.randn(batch, DIM, generator=gen),
        patches={layer: torch.randn(batch, GRID, GRID, DIM, generator=gen) for layer in LAYERS},
    )


def bank_from(
    features: Features, dtype: str = "fp32", categories: list[str] | None = None
) -> NormalMemoryBank:
    builder = NormalBankBuilder(LAYERS, dtype)
    n = features.cls.shape[0]
    builder.add(features, Batch.unlabelled(torch.arange(n)))
    names = categories or ["a"] * n
    images = [[f"/img/{i}.png", names[i], 0, [f"/img/{i}.png", 1, 1], None] for i in range(n)]
    return builder.build({"build": {"layers": list(LAYERS), "dtype": dtype}, "images": images})


def rad_model(**kwargs) -> RAD:
    retrieval = SpatialRetrieval(**{k: kwargs.pop(k) for k in ("k", "rho", "cap_k") if k in kwargs})
    maps = AnomalyMapper(256, 1.0, kernel_size=5, padding="zeros")  # RAD's maps (conf/model/rad.yaml)
    return RAD(tiny_encoder(), retrieval, maps, evaluator=CategoryEvaluator(), **kwargs)


# ------------------------------------------------------------------------------- literal reference
def reference_scores(query: Features, memory: Features, k, rho, weights, map_size=256):
    """Global top-K by cosine, a per-position window loop, layer mean, upsample, 5×5 σ1 blur, top 1 %."""
    batch = query.cls.shape[0]
    n = memory.cls.shape[0]
    maps, image_scores = [], []
    for b in range(batch):
        sims = [
            float(F.cosine_similarity(query.cls[b].double(), memory.cls[i].double(), dim=0)) for i in range(n)
        ]
        order = sorted(range(n), key=lambda i: (-sims[i], i))
        neighbors = order if k is None else order[:k]
        fused = torch.zeros(GRID, GRID, dtype=torch.float64)
        for layer, weight in zip(LAYERS, weights, strict=True):
            q = query.patches[layer][b].double()
            for i in range(GRID):
                for j in range(GRID):
                    best = -math.inf
                    for m in neighbors:
                        for y in range(GRID):
                            for x in range(GRID):
                                if rho is not None and (abs(y - i) > rho or abs(x - j) > rho):
                                    continue
                                z = memory.patches[layer][m, y, x].double()
                                best = max(best, float(q[i, j] @ z / (q[i, j].norm() * z.norm())))
                    fused[i, j] += weight * (1 - best)
        up = F.interpolate(fused[None, None], size=(map_size, map_size), mode="bilinear", align_corners=False)
        offsets = torch.arange(-2, 3, dtype=torch.float64)
        g = torch.exp(-0.5 * offsets**2)
        kernel = torch.outer(g, g) / torch.outer(g, g).sum()  # 5×5, σ 1, normalised to sum 1
        blurred = F.conv2d(up, kernel[None, None], padding=2)[0, 0]  # zero padding
        values = sorted(blurred.flatten().tolist(), reverse=True)
        top = values[: int(0.01 * map_size * map_size)]
        maps.append(blurred)
        image_scores.append(sum(top) / len(top))
    return torch.stack(maps), torch.tensor(image_scores, dtype=torch.float64)


@pytest.mark.parametrize(
    ("k", "rho", "weights"),
    [(3, 1, None), (2, 0, [0.25, 0.75]), (None, None, None), (4, 2, [1.0, 3.0])],
)
def test_rad_scores_equal_the_literal_reference(k, rho, weights):
    memory = random_features(6, seed=1)
    query = random_features(2, seed=2)
    model = rad_model(k=k, rho=rho, layer_weights=weights)
    model.attach_memory(bank_from(memory), {"path": "unit"})
    scored = model.combine(model.score(query))
    expected_weights = [0.5, 0.5] if weights is None else [w / sum(weights) for w in weights]
    maps, image = reference_scores(query, memory, k, rho, expected_weights)
    torch.testing.assert_close(scored.anomaly_map.double(), maps, atol=2e-6, rtol=0)
    torch.testing.assert_close(scored.image_score.double(), image, atol=2e-6, rtol=0)


def test_one_layer_ablation_scores_that_layer_only():
    memory, query = random_features(5, seed=3), random_features(1, seed=4)
    full = rad_model(k=3, rho=1)
    full.attach_memory(bank_from(memory), {})
    single = rad_model(k=3, rho=1, layers=[3])
    single.attach_memory(bank_from(memory), {})
    weights_on_3 = rad_model(k=3, rho=1, layer_weights=[0.0, 1.0])
    weights_on_3.attach_memory(bank_from(memory), {})
    torch.testing.assert_close(single.score(query).patch_scores, weights_on_3.score(query).patch_scores)
    assert not torch.allclose(single.score(query).patch_scores, full.score(query).patch_scores)


def test_k_larger_than_the_memory_is_a_clear_error_unless_capped():
    bank = bank_from(random_features(4, seed=5))
    with pytest.raises(ValueError, match=r"retrieval\.k=10 is larger than the memory \(4 images\)"):
        rad_model(k=10).attach_memory(bank, {})
    capped = rad_model(k=10, cap_k=True)
    capped.attach_memory(bank, {})
    assert capped.k_used == 4
    everything = rad_model(k=None)
    everything.attach_memory(bank, {})
    query = random_features(1, seed=6)
    torch.testing.assert_close(capped.score(query).patch_scores, everything.score(query).patch_scores)


def test_layers_the_memory_lacks_are_refused():
    model = rad_model(k=2, layers=[2])
    with pytest.raises(ValueError, match=r"model\.layers=\[2\].*memory's layers \[1, 3\]"):
        model.attach_memory(bank_from(random_features(3, seed=0)), {})


# ------------------------------------------------------------------------------------ the memory
@pytest.mark.parametrize(("dtype", "atol"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1e-2)])
@pytest.mark.parametrize("mmap", [True, False])
def test_dtype_options_round_trip(tmp_path, dtype, atol, mmap):
    features = random_features(5, seed=7)
    bank = bank_from(features, dtype, categories=["a", "a", "b", "b", "b"])
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = NormalMemoryBank.load(path, mmap=mmap)
    assert loaded.patches[1].memory_mapped is mmap
    assert loaded.storage_dtype == dtype and loaded.layers == list(LAYERS)
    assert loaded.categories == ["a", "b"] and loaded.category.tolist() == [0, 0, 1, 1, 1]
    assert loaded.images_per_category() == {"a": 2, "b": 3}
    torch.testing.assert_close(loaded.cls, F.normalize(features.cls, dim=-1))
    for layer in LAYERS:
        expected = F.normalize(features.patches[layer], dim=-1)
        rows = loaded.patches[layer][torch.arange(5)]
        assert rows.dtype == torch.float32
        torch.testing.assert_close(rows, expected, atol=atol, rtol=0)
        torch.testing.assert_close(rows, bank.patches[layer][torch.arange(5)])  # saved = built


def test_int8_is_symmetric_per_vector_and_cosine_equivalent():
    vectors = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    quantized, scale = quantize_int8(vectors)
    assert quantized.dtype == torch.int8 and quantized.abs().amax(dim=-1).tolist() == [127] * 7
    assert ((quantized.float() * scale[:, None] - vectors).abs() <= scale[:, None] / 2 + 1e-7).all()
    # Cosine ignores the per-vector scale: the stored integers alone give the same similarities.
    torch.testing.assert_close(
        F.cosine_similarity(quantized.float(), vectors[:1]),
        F.cosine_similarity(quantized.float() * scale[:, None], vectors[:1]),
    )


def _overwrite_rows_except(path, name: str, keep: set[int]) -> None:
    """Overwrite every fp16 row of tensor ``name`` in the file except those in ``keep`` with another unit
    vector (the first axis), which passes the bank's checks but scores differently."""
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        entry = header[name]
        start, end = entry["data_offsets"]
        n = entry["shape"][0]
        row_bytes = (end - start) // n
        other = np.zeros((row_bytes // 2 // DIM, DIM), dtype=np.float16)
        other[:, 0] = 1
        for row in range(n):
            if row not in keep:
                handle.seek(8 + size + start + row * row_bytes)
                handle.write(other.tobytes())


def test_memory_mapped_scoring_reads_only_the_k_retrieved_images(tmp_path):
    memory, query = random_features(12, seed=8), random_features(1, seed=9)
    path = bank_from(memory, "fp16").save(tmp_path / "bank.safetensors")
    model = rad_model(k=3, rho=1)
    model.attach_memory(NormalMemoryBank.load(path), {})
    expected = model.score(query).patch_scores
    retrieved = set(SpatialRetrieval(k=3).neighbors(query.cls, model.bank.cls)[0].tolist())
    # Every other image's patch rows change on disk: if any were read, the scores would change.
    for layer in LAYERS:
        _overwrite_rows_except(path, f"patches.{layer}", retrieved)
    bank = NormalMemoryBank.load(path)
    model = rad_model(k=3, rho=1)
    model.attach_memory(bank, {})
    torch.testing.assert_close(model.score(query).patch_scores, expected)
    assert all(bank.patches[layer].rows_read == 3 for layer in LAYERS)


def _pick(features: Features, rows: list[int]) -> Features:
    return Features(features.cls[rows], {k: v[rows] for k, v in features.patches.items()})


def _feed(builder: NormalBankBuilder, features: Features, indices: list[int], batch: int = 2) -> None:
    for start in range(0, len(indices), batch):
        chosen = indices[start : start + batch]
        builder.add(
            _pick(features, list(range(start, start + len(chosen)))), Batch.unlabelled(torch.tensor(chosen))
        )


def _by_hand(features: Features, dtype: str) -> dict[str, torch.Tensor]:
    """The bank's tensors written out directly: normalised CLS, each layer normalised then stored."""
    n = features.cls.shape[0]
    tensors = {"cls": F.normalize(features.cls.float(), dim=-1), "category": torch.zeros(n, dtype=torch.long)}
    for layer in LAYERS:
        grid = F.normalize(features.patches[layer].float(), dim=-1)
        if dtype == "int8":
            tensors[f"patches.{layer}"], tensors[f"scales.{layer}"] = quantize_int8(grid)
        else:
            tensors[f"patches.{layer}"] = grid.to({"fp16": torch.float16, "fp32": torch.float32}[dtype])
    return tensors


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "int8"])
def test_built_bank_file_equals_the_rows_encoded_by_hand_however_the_pass_was_split(tmp_path, dtype):
    features = random_features(7, seed=10)
    expected = _by_hand(features, dtype)
    metadata = {"build": {"layers": list(LAYERS), "dtype": dtype}}
    in_order = NormalBankBuilder(LAYERS, dtype, tmp_path / "a")
    _feed(in_order, features, list(range(7)))
    shuffled = NormalBankBuilder(LAYERS, dtype, tmp_path / "b")  # one process whose rows came out of order
    order = [3, 0, 5, 1, 6, 2, 4]
    _feed(shuffled, _pick(features, order), order, batch=3)
    # Two processes with interleaved shares; the second repeats image 0 (a padding sampler) with other
    # features: the first process's copy is the one kept.
    first, second = (
        NormalBankBuilder(LAYERS, dtype, tmp_path / "c"),
        NormalBankBuilder(LAYERS, dtype, tmp_path / "c"),
    )
    _feed(first, _pick(features, [0, 2, 4, 6]), [0, 2, 4, 6])
    repeated = _pick(features, [1, 3, 5, 0])
    repeated.cls[3], repeated.patches[1][3] = -repeated.cls[3], -repeated.patches[1][3]
    _feed(second, repeated, [1, 3, 5, 0], batch=3)
    states = [first.state(), second.state()]  # what all_gather hands every process
    merged = NormalBankBuilder(LAYERS, dtype)
    merged.load_states(states)
    for name, builder in {"in order": in_order, "shuffled": shuffled, "two processes": merged}.items():
        path = builder.build(metadata).save(tmp_path / f"{name}.safetensors")
        stored = load_file(str(path))
        assert stored.keys() == expected.keys(), name
        for tensor_name, tensor in expected.items():
            assert stored[tensor_name].dtype == tensor.dtype, (name, tensor_name)
            assert torch.equal(stored[tensor_name], tensor), (name, tensor_name)
        assert NormalMemoryBank.load(path).n_images == 7
    assert set(merged.state()) == set(), "the merging builder wrote no rows of its own"


def test_rows_go_to_scratch_files_beside_the_bank_as_they_arrive(tmp_path):
    target = tmp_path / "bank.safetensors"
    builder = NormalBankBuilder(LAYERS, "fp16", target)
    features = random_features(5, seed=11)
    builder.add(_pick(features, [0, 1]), Batch.unlabelled(torch.tensor([0, 1])))
    (scratch,) = tmp_path.iterdir()  # hidden, named after the bank, this host and this process
    assert scratch.is_dir() and scratch.name.startswith(
        f".bank.safetensors.{socket.gethostname()}-{os.getpid()}."
    )
    row_bytes = GRID * GRID * DIM * 2  # fp16
    assert (scratch / "patches.1.bin").stat().st_size == 2 * row_bytes  # on disk before the pass ends
    builder.add(_pick(features, [2, 3, 4]), Batch.unlabelled(torch.tensor([2, 3, 4])))
    assert (scratch / "patches.3.bin").stat().st_size == 5 * row_bytes
    bank = builder.build({"build": {"layers": list(LAYERS), "dtype": "fp16"}})
    assert not target.exists(), "the bank file appears only when it is saved whole"
    bank.save(target)
    builder.close()
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
    for layer in LAYERS:
        assert torch.equal(
            load_file(str(target))[f"patches.{layer}"], _by_hand(features, "fp16")[f"patches.{layer}"]
        )


_KILLED_BUILD = """
import os, signal, sys, torch
from anomret.data.batch import Batch
from anomret.encoders.base import Features
from anomret.memory.normal_builder import NormalBankBuilder
builder = NormalBankBuilder((1,), "fp16", __import__("pathlib").Path(sys.argv[1]))
builder.add(Features(torch.ones(2, 4), {1: torch.ones(2, 2, 2, 4)}), Batch.unlabelled(torch.arange(2)))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration  # starts processes
def test_a_killed_build_leaves_no_bank_and_the_next_build_removes_its_rows(tmp_path):
    target = tmp_path / "bank.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(anomret.__file__).parents[1])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(target)], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.is_dir() and left.name.startswith(".bank.safetensors.") and (left / "patches.1.bin").exists()
    builder = NormalBankBuilder(LAYERS, "fp16", target)
    builder.add(random_features(1, seed=0), Batch.unlabelled(torch.tensor([0])))
    assert not left.exists(), "the killed writer's rows were removed"
    builder.build({"build": {"layers": list(LAYERS), "dtype": "fp16"}}).save(target)
    builder.close()
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


_MEASURED_BUILD = """
import resource, sys, torch
from anomret.data.batch import Batch
from pathlib import Path
from anomret.encoders.base import Features
from anomret.memory.normal_builder import NormalBankBuilder
target, n, batch = Path(sys.argv[1]), 256, 8
builder = NormalBankBuilder((1, 2), "fp32", target)
for start in range(0, n, batch):
    generator = torch.Generator().manual_seed(start)
    grids = {layer: torch.randn(batch, 16, 16, 256, generator=generator) for layer in (1, 2)}
    builder.add(Features(torch.randn(batch, 256, generator=generator), grids), Batch.unlabelled(torch.arange(start, start + batch)))
    del grids
    if start == 0:  # after one batch: torch and the allocator are warm
        first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
builder.build({"build": {"layers": [1, 2], "dtype": "fp32"}}).save(target)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - first) * 1024)
"""


@pytest.mark.integration  # starts processes
def test_building_a_bank_holds_about_one_batch_in_memory_not_the_bank(tmp_path):
    target = tmp_path / "bank.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(anomret.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_BUILD, str(target)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    growth = int(done.stdout.split()[-1])
    bank_bytes = target.stat().st_size
    assert bank_bytes > 128 * 2**20  # 256 images × 2 layers × 16×16×256 fp32
    # One batch of features is 4 MiB; holding the rows (as an in-memory build does) would add 128 MiB.
    assert growth < bank_bytes / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB while building"


def test_rows_of_a_process_that_are_not_visible_here_are_a_clear_error(tmp_path):
    info = SpillInfo(str(tmp_path / "elsewhere"), "otherhost", {"patches.1": ("float16", (2, 4, 4, 16))})
    with pytest.raises(BankError, match=r"storage every process shares.*memory\.cache_dir"):
        info.file("patches.1")


def test_other_kind_and_missing_layers_are_refused(tmp_path):
    from anomret.memory.store import save_bank

    path = save_bank(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"kind": "labeled"})
    with pytest.raises(BankError, match="not a RAD normal-image bank"):
        NormalMemoryBank.load(path)
    with pytest.raises(ValueError, match=r"memory\.layers=\[5\]"):
        NormalMemorySettings(layers=[5]).resolve_layers((1, 3))
    with pytest.raises(ValueError, match=r"memory\.dtype"):
        NormalMemorySettings(dtype="bf16")
    with pytest.raises(ValueError, match=r"memory\.fraction"):
        NormalMemorySettings(fraction=1.5)


# ------------------------------------------------------------------------------ few-shot selection
def _table(counts: dict[str, int]) -> SampleTable:
    return SampleTable(
        Sample(f"/d/{c}/train/good/{i:03d}.png", None, c, 0, "train", "unit")  # type: ignore[arg-type]
        for c, n in counts.items()
        for i in range(n)
    )


def test_few_shot_draw_is_deterministic_per_seed_nested_and_per_category():
    samples = _table({"a": 10, "b": 7, "c": 1})
    draw = select_images(samples, shots=2, seed=3)
    assert [s.image_path for s in draw] == [s.image_path for s in select_images(samples, shots=2, seed=3)]
    assert {c: len(t) for c, t in draw.by_category().items()} == {"a": 2, "b": 2, "c": 1}
    draws = {
        tuple(str(s.image_path) for s in select_images(samples, shots=2, seed=seed)) for seed in range(6)
    }
    assert len(draws) > 1, "other seeds must draw other images"
    four = {str(s.image_path) for s in select_images(samples, shots=4, seed=3)}
    assert {str(s.image_path) for s in draw} <= four, "a larger budget keeps the smaller one's images"
    # Source order is kept (rows of the bank follow the dataset).
    positions = [list(samples).index(s) for s in draw]
    assert positions == sorted(positions)


def test_fraction_and_incremental_subset():
    samples = _table({"a": 60, "b": 213})
    counts = {c: len(t) for c, t in select_images(samples, fraction=0.05).by_category().items()}
    assert counts == {"a": 3, "b": 11}
    incremental = select_images(samples, fraction=0.01, categories=["b"])
    assert {c: len(t) for c, t in incremental.by_category().items()} == {"a": 60, "b": 2}
    with pytest.raises(ValueError, match="subset_categories"):
        select_images(samples, shots=1, categories=["zzz"])
    assert select_images(samples) is samples


def test_patch_rows_count_reads():
    rows = PatchRows(F.normalize(torch.randn(5, 2, 2, 3), dim=-1))
    rows[torch.tensor([0, 4])]
    assert rows.rows_read == 2 and len(rows) == 5


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_scores_from_stored_rows_equal_scores_from_dequantised_rows(tmp_path, dtype):
    memory, query = random_features(6, seed=11), random_features(2, seed=12)
    bank = NormalMemoryBank.load(bank_from(memory, dtype).save(tmp_path / "bank.safetensors"))
    model = rad_model(k=4, rho=1)
    model.attach_memory(bank, {})
    stored = model.score(query).patch_scores  # the model reads raw fp16 / int8 rows
    retrieval = SpatialRetrieval(k=4, rho=1)
    dequantised = retrieval.scores(query.patches, bank.patches, retrieval.neighbors(query.cls, bank.cls))
    torch.testing.assert_close(stored, dequantised, atol=1e-6, rtol=0)
    exact = rad_model(k=4, rho=1)
    exact.attach_memory(bank_from(memory, "fp32"), {})
    tolerance = 1e-3 if dtype == "fp16" else 1e-2
    torch.testing.assert_close(stored, exact.score(query).patch_scores, atol=tolerance, rtol=0)


def test_streamed_bank_file_equals_the_one_save_writes(tmp_path):
    from safetensors.torch import load_file

    from anomret.memory.normal_bank import write_concatenated
    from anomret.memory.store import read_bank_metadata

    features = random_features(7, seed=13)
    whole = bank_from(features, "int8", categories=["a", "a", "b", "b", "b", "c", "c"])
    first_features = Features(features.cls[:3], {k: v[:3] for k, v in features.patches.items()})
    rest = Features(features.cls[3:], {k: v[3:] for k, v in features.patches.items()})
    first = bank_from(first_features, "int8", categories=["a", "a", "b"])
    second = bank_from(rest, "int8", categories=["b", "b", "c", "c"])
    path = first.save(tmp_path / "bank.safetensors")
    # Rewritten in place from its own memory map, plus the new rows.
    write_concatenated(path, NormalMemoryBank.load(path), second, {"build": whole.metadata["build"]})
    streamed = load_file(str(path))
    expected = {"cls": whole.cls, "category": whole.category}
    for layer, rows in whole.patches.items():
        expected[f"patches.{layer}"], expected[f"scales.{layer}"] = rows.all()
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    assert read_bank_metadata(path)["categories"] == ["a", "b", "c"]
    assert NormalMemoryBank.load(path).images_per_category() == {"a": 2, "b": 3, "c": 2}
