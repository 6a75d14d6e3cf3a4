"""The in-memory feature tier: budgets and eviction, keys like the store's, datasets that leave held images
undecoded, and an extractor that serves them with exactly the features a fresh pass (or the store) gives."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

import anomret.data.dataset as dataset_module
from anomret.data.batch import collate_items
from anomret.data.dataset import AnomalyDataset
from anomret.data.samples import Sample, SampleTable
from anomret.encoders.base import Features, Preprocess
from anomret.encoders.timm_vit import TimmViTEncoder
from anomret.features.extractor import FeatureExtractor
from anomret.features.memory_tier import FeatureMemory, TieredFeatures, namespace, tiered_features
from anomret.features.store import FeatureStore

PRE = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CPU = torch.device("cpu")


class ToyEncoder(torch.nn.Module):
    """Deterministic and small: mean colour as CLS, a 4×4 average-pooled grid as patches."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.2345678), requires_grad=False)
        self.preprocess = PRE
        self.calls = 0

    def forward(self, images):
        self.calls += images.shape[0]
        grid = torch.nn.functional.avg_pool2d(images, 4).permute(0, 2, 3, 1) * self.scale
        return Features(cls=images.mean(dim=(2, 3)) * self.scale, patches={1: grid})


def _table(tmp_path, n=5) -> SampleTable:
    samples = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 255 - 30 * i, 7 * i)).save(path)
        samples.append(Sample(path, None, "c", 0, "test", "toy"))
    return SampleTable(samples)


def _memory(host="1MiB", device=0) -> FeatureMemory:
    memory = FeatureMemory()
    memory.configure(host, device)
    return memory


def _tensors(value: float, size: int = 64) -> dict[str, torch.Tensor]:
    return {"cls": torch.full((size // 4,), value), "patches.1": torch.full((size // 4, 3), value)}


def test_entries_are_copies_kept_in_their_dtype_and_the_least_recently_used_go_first():
    memory = _memory(host=3 * 64 * 4)  # three entries of 64 float32 values
    source = _tensors(1.0)
    assert memory.put("ns", "a", source, torch.float32)
    source["cls"].fill_(7.0)  # the batch's tensors are free to change: the tier holds a copy
    assert memory.get("ns", "a", CPU)["cls"][0] == 1.0
    memory.put("ns", "b", _tensors(2.0), torch.float32)
    memory.put("ns", "c", _tensors(3.0), torch.float32)
    memory.get("ns", "a", CPU)  # a is used again: b is now the oldest
    memory.put("ns", "d", _tensors(4.0), torch.float32)
    assert [memory.holds("ns", key) for key in "abcd"] == [True, False, True, True]
    assert memory.host_bytes == 3 * 64 * 4
    assert not memory.put("ns", "huge", _tensors(5.0, size=4096), torch.float32), "larger than the budget"
    assert memory.put("ns", "half", _tensors(0.5), torch.float16)
    assert memory.get("ns", "half", CPU)["cls"].dtype == torch.float16


def test_a_smaller_budget_drops_entries_and_zero_turns_the_tier_off():
    memory = _memory()
    for key in "abc":
        memory.put("ns", key, _tensors(1.0), torch.float32)
    memory.configure(host=64 * 4, device=0)
    assert len(memory) == 1 and memory.holds("ns", "c")
    memory.configure(host=0, device=0)
    assert len(memory) == 0 and not memory.enabled


def test_features_computed_on_another_kind_of_device_are_not_served():
    memory = _memory()
    memory.put("ns", "a", _tensors(1.0), torch.float32)
    assert memory.get("ns", "a", torch.device("meta")) is None
    assert memory.get("ns", "a", CPU) is not None


def test_a_worker_gets_the_keys_never_the_tensors():
    memory = _memory(host="64MiB")
    memory.put("ns", "a", {"cls": torch.zeros(2**20)}, torch.float32)  # 4 MiB
    copy = pickle.loads(pickle.dumps(memory))
    assert len(pickle.dumps(memory)) < 10_000
    assert copy.holds("ns", "a") and not copy.holds("ns", "b")
    assert copy.get("ns", "a", CPU) is None


def test_namespaces_follow_the_encoder_its_precision_and_the_storage(tmp_path):
    def tiny(**kwargs):
        return TimmViTEncoder(
            "vit_tiny_patch16_224",
            layers=[2],
            image_size=32,
            name="tiny",
            model_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2},
            **kwargs,
        )

    encoder = tiny()
    store16 = FeatureStore(tmp_path, encoder.fingerprint(), encoder.preprocess, "fp16")
    store32 = FeatureStore(tmp_path, encoder.fingerprint(), encoder.preprocess, "fp32")
    names = {
        namespace(encoder, None),
        namespace(encoder, store16),
        namespace(encoder, store32),
        namespace(tiny(precision="bf16"), None),
        namespace(tiny(seed=1), None),
    }
    assert len(names) == 5
    assert namespace(tiny(), None) == namespace(encoder, None)


def test_held_images_are_neither_decoded_nor_read_from_the_store(tmp_path, monkeypatch):
    table = _table(tmp_path)
    memory = _memory()
    source = TieredFeatures(memory, "ns", None)
    extractor = FeatureExtractor(ToyEncoder(), memory=source)
    dataset = AnomalyDataset(table, PRE, feature_store=source)
    extractor(collate_items([dataset[i] for i in (0, 2)]))  # encoded once, now held

    decoded = []
    original = dataset_module.read_image
    monkeypatch.setattr(dataset_module, "read_image", lambda path: decoded.append(path) or original(path))
    items = [dataset[i] for i in range(5)]
    assert [("image" in item, "features" in item) for item in items] == [
        (False, False),
        (True, False),
        (False, False),
        (True, False),
        (True, False),
    ]
    assert sorted(str(p) for p in decoded) == sorted(str(table[i].image_path) for i in (1, 3, 4))


@pytest.mark.parametrize("store_dtype", [None, "fp16", "fp32"])
def test_served_features_equal_a_fresh_pass_or_the_store_bit_for_bit(tmp_path, store_dtype):
    table = _table(tmp_path)
    encoder = ToyEncoder()
    plain = AnomalyDataset(table, PRE)
    fresh = encoder(collate_items([plain[i] for i in range(5)]).image)
    store = (
        None if store_dtype is None else FeatureStore(tmp_path / "store", {"name": "toy"}, PRE, store_dtype)
    )
    if store is not None:  # what the store gives: features rounded to its dtype
        fresh = fresh.to(store.dtype).to(torch.float32)

    source = TieredFeatures(_memory(), "ns", store)
    extractor = FeatureExtractor(encoder, store, source)
    dataset = AnomalyDataset(table, PRE, feature_store=source)
    first = extractor(collate_items([dataset[i] for i in (1, 3)]))
    again = extractor(collate_items([dataset[i] for i in range(5)]))  # 1 and 3 served from memory
    assert torch.equal(first.cls, fresh.cls[[1, 3]])
    assert torch.equal(again.cls, fresh.cls) and torch.equal(again.patches[1], fresh.patches[1])
    assert extractor.encoded == 5 and extractor.from_memory == 2
    expected = "2 of them from memory" if store else "2 reused from memory"
    assert expected in extractor.describe()


def test_an_image_the_tier_dropped_after_promising_it_is_decoded_and_encoded_here(tmp_path):
    table = _table(tmp_path)
    memory = _memory()
    source = TieredFeatures(memory, "ns", None)
    encoder = ToyEncoder()
    extractor = FeatureExtractor(encoder, memory=source)
    dataset = AnomalyDataset(table, PRE, feature_store=source)
    expected = extractor(collate_items([dataset[i] for i in range(3)]))
    items = [dataset[i] for i in range(3)]  # all promised by the tier
    memory.clear()  # ... which then drops them
    again = extractor(collate_items(items))
    assert torch.equal(again.cls, expected.cls) and torch.equal(again.patches[1], expected.patches[1])
    assert encoder.calls == 6 and extractor.from_memory == 0


def test_bad_memory_settings_are_refused_by_name():
    encoder = TimmViTEncoder(
        "vit_tiny_patch16_224",
        layers=[2],
        image_size=32,
        name="tiny",
        model_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2},
    )
    with pytest.raises(ValueError, match=r"features\.memory\.host"):
        tiered_features({"host": "plenty"}, encoder, None)
    with pytest.raises(ValueError, match=r"unknown features\.memory settings"):
        tiered_features({"ram": "1GiB"}, encoder, None)
    assert tiered_features({"host": 0, "device": 0}, encoder, None) is None
