"""The feature store: keys, namespaces, dtypes, batches that mix stored and fresh images, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import re

import pytest
import torch

from anomret.data.batch import collate_items
from anomret.data.dataset import AnomalyDataset
from anomret.data.samples import Sample, SampleTable
from anomret.encoders.base import Features, Preprocess
from anomret.features.extractor import FeatureExtractor
from anomret.features.store import FeatureStore, features_to_tensors, image_key

PRE = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FINGERPRINT = {"name": "toy", "seed": 0}


class ToyEncoder(torch.nn.Module):
    """A real (if small) deterministic encoder: mean colour as CLS, 4×4 average-pooled grid as patches."""

    name = "toy"
    layers = (1,)

    def forward(self, images):
        grid = torch.nn.functional.avg_pool2d(images, 4).permute(0, 2, 3, 1)
        return Features(cls=images.mean(dim=(2, 3)) * 1.2345678, patches={1: grid}, projected={1: grid * 3})


def _images(tmp_path, n=5):
    from PIL import Image

    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 255 - 30 * i, 7 * i)).save(path)
        paths.append(path)
    return paths


def _table(paths):
    return SampleTable(Sample(p, None, "c", 0, "test", "toy") for p in paths)


def test_entries_round_trip_and_namespaces_separate_encoders_preprocessing_and_dtype(tmp_path):
    store = FeatureStore(tmp_path, FINGERPRINT, PRE, "fp32")
    features = ToyEncoder()(torch.rand(2, 3, 16, 16))
    store.write("k" * 32, features_to_tensors(features, 1))
    read = store.read("k" * 32)
    torch.testing.assert_close(read["cls"], features.cls[1], rtol=0, atol=0)
    torch.testing.assert_close(read["projected.1"], features.projected[1][1], rtol=0, atol=0)
    others = [
        FeatureStore(tmp_path, {**FINGERPRINT, "seed": 1}, PRE, "fp32"),
        FeatureStore(tmp_path, FINGERPRINT, Preprocess(18, 16, PRE.mean, PRE.std), "fp32"),
        FeatureStore(tmp_path, FINGERPRINT, PRE, "fp16"),
    ]
    assert len({store.directory, *(other.directory for other in others)}) == 4
    assert all(other.read("k" * 32) is None for other in others)
    with pytest.raises(ValueError, match=r"features.dtype must be one of"):
        FeatureStore(tmp_path, FINGERPRINT, PRE, "int4")


def test_image_key_changes_when_the_image_is_edited(tmp_path):
    (path,) = _images(tmp_path, 1)
    key = image_key(path)
    assert image_key(path) == key
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))
    assert image_key(path) != key


def test_unreadable_entry_is_recomputed_not_fatal(tmp_path):
    store = FeatureStore(tmp_path, FINGERPRINT, PRE, "fp16")
    store.path("ab" * 16).parent.mkdir(parents=True)
    store.path("ab" * 16).write_bytes(b"garbage")
    assert store.read("ab" * 16) is None


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_batches_mixing_stored_and_fresh_images_give_the_features_of_a_fresh_pass(tmp_path, dtype):
    paths = _images(tmp_path)
    encoder = ToyEncoder()
    dataset = AnomalyDataset(_table(paths), PRE)
    reference = encoder(collate_items([dataset[i] for i in range(5)]).image)

    store = FeatureStore(tmp_path / "store", FINGERPRINT, PRE, dtype)
    stored = AnomalyDataset(_table(paths), PRE, feature_store=store)
    extractor = FeatureExtractor(encoder, store)
    extractor(collate_items([stored[i] for i in (1, 3)]))  # store two of the five
    items = [stored[i] for i in range(5)]
    assert [("features" in item, "image" in item) for item in items] == [
        (False, True),
        (True, False),
        (False, True),
        (True, False),
        (False, True),
    ]
    mixed = extractor(collate_items(items))
    assert extractor.encoded == 2 + 3 and extractor.reused == 2
    tolerance = 0 if dtype == "fp32" else 2e-3
    torch.testing.assert_close(mixed.cls, reference.cls, rtol=0, atol=tolerance)
    torch.testing.assert_close(mixed.patches[1], reference.patches[1], rtol=0, atol=tolerance)
    torch.testing.assert_close(mixed.projected[1], reference.projected[1], rtol=0, atol=tolerance)
    # Fresh features are rounded like stored ones: a run gives the same numbers with a cold or warm store.
    warm = extractor(collate_items([stored[i] for i in range(5)]))
    torch.testing.assert_close(warm.cls, mixed.cls, rtol=0, atol=0)


def _hammer(root: str, worker: int, rounds: int, queue) -> None:
    store = FeatureStore(root, FINGERPRINT, PRE, "fp32")
    torn = 0
    for round_ in range(rounds):
        for entry in range(8):
            key = f"{entry:02d}" * 16
            value = torch.full((64, 64), float(entry))
            if (round_ + worker) % 2:
                store.write(key, {"cls": value})
            read = store.read(key)
            if read is not None and not torch.equal(read["cls"], value):
                torn += 1
    queue.put(torn)


@pytest.mark.integration  # starts processes
def test_two_processes_writing_and_reading_one_store_never_see_a_partial_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_hammer, args=(str(tmp_path), w, 30, queue)) for w in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=300)
        assert process.exitcode == 0
    assert [queue.get(timeout=10), queue.get(timeout=10)] == [0, 0]
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def _stored_pass(tmp_path, n=3, dtype="fp16"):
    """A store holding the entries of ``n`` images, written by a real pass, and what reads it."""
    paths = _images(tmp_path, n)
    store = FeatureStore(tmp_path / "store", FINGERPRINT, PRE, dtype)
    dataset = AnomalyDataset(_table(paths), PRE, feature_store=store)
    extractor = FeatureExtractor(ToyEncoder(), store)
    reference = extractor(collate_items([dataset[i] for i in range(n)]))
    return store, dataset, extractor, reference


def _entry(store, dataset, i):
    return store.path(image_key(dataset.samples[i].image_path))


def test_swapped_entries_are_named_recomputed_and_overwritten(tmp_path, caplog):
    store, dataset, extractor, reference = _stored_pass(tmp_path)
    first, second = _entry(store, dataset, 0), _entry(store, dataset, 1)
    swap = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(swap)
    with caplog.at_level("WARNING", logger="anomret.features.store"):
        items = [dataset[i] for i in range(3)]
    assert ["image" in item for item in items] == [True, True, False], "both swapped entries are refused"
    for path in (first, second):
        assert f"feature store entry {path} is unsound: it holds the features of another image" in caplog.text
    assert caplog.text.count("recomputing it") == 2, "one warning per bad entry"
    again = extractor(collate_items(items))  # encodes the two images and overwrites their entries
    torch.testing.assert_close(again.cls, reference.cls, rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="anomret.features.store"):
        assert all("features" in dataset[i] for i in range(3)), "the next run finds every entry sound"
    assert not caplog.text


def _rewrite(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors, metadata = change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t, m: ({**t, "cls": t["cls"] * float("nan")}, m), "'cls' holds NaN or infinite values"),
        (lambda t, m: ({**t, "patches.1": t["patches.1"] * float("inf")}, m), "'patches.1' holds NaN"),
        (lambda t, m: ({**t, "patches.1": t["patches.1"][:2]}, m), "are not the .* this encoder gives"),
        (lambda t, m: ({**t, "patches.7": t["patches.1"].clone()}, m), "are not the .* this encoder gives"),
        (lambda t, m: ({**t, "cls": t["cls"].float()}, m), r"tensors \['cls'\] are not fp16"),
        (lambda t, m: (t, {**m, "namespace": "0" * 64}), "written for another key or store"),
        (lambda t, m: (t, {}), "written for another key or store"),
    ],
)
def test_entries_that_are_not_what_they_claim_are_named_and_recomputed(tmp_path, caplog, change, problem):
    store, dataset, extractor, reference = _stored_pass(tmp_path)
    bad = _entry(store, dataset, 1)
    _rewrite(bad, change)
    with caplog.at_level("WARNING", logger="anomret.features.store"):
        items = [dataset[i] for i in range(3)]
    assert ["image" in item for item in items] == [False, True, False]
    assert re.search(rf"feature store entry {re.escape(str(bad))} is unsound: .*{problem}", caplog.text)
    torch.testing.assert_close(
        extractor(collate_items(items)).patches[1], reference.patches[1], rtol=0, atol=0
    )
    assert store.read(image_key(dataset.samples[1].image_path)) is not None, "overwritten with a sound entry"


def test_workers_of_a_data_loader_recompute_a_bad_entry(tmp_path):
    from torch.utils.data import DataLoader

    store, dataset, extractor, reference = _stored_pass(tmp_path, n=4)
    _rewrite(_entry(store, dataset, 2), lambda t, m: ({**t, "cls": t["cls"] * float("nan")}, m))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_items)
    (batch,) = list(loader)
    assert batch.fresh.tolist() == [2] and batch.cached.tolist() == [0, 1, 3]
    torch.testing.assert_close(extractor(batch).cls, reference.cls, rtol=0, atol=0)
