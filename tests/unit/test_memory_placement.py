"""Where RAD's patch rows are read from (memory.placement): every placement gives the same scores bit for
bit, a streamed batch reads each neighbour row once, and memory stays bounded by the budget."""

from __future__ import annotations

import functools

import pytest
import torch

from anomret.data.batch import Batch
from anomret.encoders.base import Features
from anomret.encoders.timm_vit import TimmViTEncoder
from anomret.maps import AnomalyMapper
from anomret.memory.normal import NormalMemorySettings
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.normal_builder import NormalBankBuilder
from anomret.memory.placement import DeviceRows, RowPlacement, StreamedRows
from anomret.memory.rows import PatchRows
from anomret.models.rad import RAD
from anomret.retrieval.spatial import SpatialRetrieval

LAYERS = (1, 3)
DIM, GRID = 16, 4
ROW_BYTES_FP16 = GRID * GRID * DIM * 2


@functools.cache
def tiny_encoder() -> TimmViTEncoder:
    return TimmViTEncoder(
        "vit_tiny_patch16_224",
        layers=list(LAYERS),
        image_size=32,
        name="tiny",
        model_kwargs={"patch_size": 8, "embed_dim": DIM, "depth": 4, "num_heads": 2},
    )


def features(batch: int, seed: int) -> Features:
    gen = torch.Generator().manual_seed(seed)
    return Features(
        cls=torch.randn(batch, DIM, generator=gen),
        patches={layer: torch.randn(batch, GRID, GRID, DIM, generator=gen) for layer in LAYERS},
    )


def saved_bank(tmp_path, dtype: str = "fp16", n: int = 24) -> str:
    builder = NormalBankBuilder(LAYERS, dtype)
    builder.add(features(n, seed=1), Batch.unlabelled(torch.arange(n)))
    images = [[f"/img/{i}.png", "a", 0, [f"/img/{i}.png", 1, 1], None] for i in range(n)]
    bank = builder.build({"build": {"layers": list(LAYERS), "dtype": dtype}, "images": images})
    return str(bank.save(tmp_path / f"bank-{dtype}.safetensors"))


def scores(
    path: str, placement: RowPlacement, *, mmap: bool = True, k: int = 5, rho: int = 1, batch: int = 6
):
    bank = NormalMemoryBank.load(path, mmap=mmap)
    bank.placement = placement
    model = RAD(tiny_encoder(), SpatialRetrieval(k=k, rho=rho), AnomalyMapper(32, 1.0, kernel_size=5))
    model.attach_memory(bank, {})
    return model.score(features(batch, seed=2)).patch_scores, model.bank


def loader_scores(path: str, *, k: int = 5, rho: int = 1, batch: int = 6) -> torch.Tensor:
    """Rows read through the memory map's row loader chunk by chunk (the path before placements)."""
    bank = NormalMemoryBank.load(path, mmap=True)
    query = features(batch, seed=2)
    retrieval = SpatialRetrieval(k=k, rho=rho)
    neighbors = retrieval.neighbors(query.cls, bank.cls)
    stored = {layer: bank.patches[layer].stored() for layer in LAYERS}
    return retrieval.scores(dict(query.patches), stored, neighbors)


PLACEMENTS = {
    "device": RowPlacement("device"),
    "stream": RowPlacement("stream"),
    "stream, one image per group": RowPlacement("stream", stream_budget=1),
    "stream, groups of a few images": RowPlacement("stream", stream_budget=9 * ROW_BYTES_FP16),
    "stream, prefetched in a thread": RowPlacement("stream", prefetch=True),
    "stream, prefetched, small groups": RowPlacement(
        "stream", stream_budget=7 * ROW_BYTES_FP16, prefetch=True
    ),
    "auto": RowPlacement(),
}


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "int8"])
@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(("k", "rho"), [(5, 1), (24, 0), (3, 3)])
def test_every_placement_gives_the_loaders_scores_bit_for_bit(tmp_path, dtype, mmap, k, rho):
    path = saved_bank(tmp_path, dtype)
    expected = loader_scores(path, k=k, rho=rho)
    for name, placement in PLACEMENTS.items():
        got, _ = scores(path, placement, mmap=mmap, k=k, rho=rho)
        assert torch.equal(got, expected), (name, (got - expected).abs().max())


def test_auto_reads_rows_in_place_from_ram_and_streams_a_memory_map(tmp_path):
    path = saved_bank(tmp_path)
    assert isinstance(scores(path, RowPlacement(), mmap=False)[1].placed, DeviceRows)
    assert isinstance(scores(path, RowPlacement(), mmap=True)[1].placed, StreamedRows)
    # A device budget smaller than the rows: streamed even from RAM.
    assert isinstance(scores(path, RowPlacement(device_budget=1000), mmap=False)[1].placed, StreamedRows)


def test_device_placement_of_ram_rows_is_the_loaded_tensor_itself(tmp_path):
    bank = NormalMemoryBank.load(saved_bank(tmp_path), mmap=False)
    placed = DeviceRows(bank.patches, LAYERS, torch.device("cpu"))
    assert all(placed.tensors[layer] is bank.patches[layer].values for layer in LAYERS)


def test_a_streamed_batch_reads_each_neighbour_row_once(tmp_path):
    path = saved_bank(tmp_path)
    bank = NormalMemoryBank.load(path)
    bank.placement = RowPlacement("stream")
    model = RAD(tiny_encoder(), SpatialRetrieval(k=5, rho=1), AnomalyMapper(32, 1.0, kernel_size=5))
    model.attach_memory(bank, {})
    query = features(6, seed=2)
    unique = torch.unique(model.retriever.neighbors(query.cls, bank.cls)).numel()
    assert unique < 6 * 5, "the test needs neighbours shared between images"
    model.score(query)
    assert [bank.patches[layer].rows_read for layer in LAYERS] == [unique, unique]


def test_groups_fit_the_budget_and_cover_the_batch_in_order():
    rows = PatchRows(torch.zeros(30, 2, 2, 4, dtype=torch.float16))
    row_bytes = 2 * 2 * 4 * 2
    placed = StreamedRows({1: rows}, [1], torch.device("cpu"), budget=6 * row_bytes)
    neighbors = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [10, 11, 12], [20, 21, 22], [0, 20, 29]])
    groups = list(placed.groups(neighbors, [1]))
    assert [g.queries for g in groups] == [slice(0, 3), slice(3, 5), slice(5, 6)]
    for group in groups:
        index = neighbors[group.queries]
        bank = group.banks[1]
        assert bank.shape[0] == torch.unique(index).numel() <= 6
        # Remapped neighbours name the same stored rows.
        assert torch.equal(torch.unique(index)[group.neighbors], index)


def test_one_image_needs_more_than_the_budget_its_group_still_scores():
    rows = PatchRows(torch.randn(40, 2, 2, 4).half())
    placed = StreamedRows({1: rows}, [1], torch.device("cpu"), budget=1)
    neighbors = torch.arange(20).view(2, 10)
    groups = list(placed.groups(neighbors, [1]))
    assert [g.queries for g in groups] == [slice(0, 1), slice(1, 2)]


def test_streamed_memory_is_bounded_by_the_budget_whatever_the_bank_size():
    row_bytes = 2 * 2 * 4 * 2
    budget = 8 * row_bytes
    for n_bank in (50, 5000):
        rows = PatchRows(torch.zeros(n_bank, 2, 2, 4, dtype=torch.float16))
        placed = StreamedRows({1: rows, 2: rows}, [1, 2], torch.device("cpu"), budget=budget, prefetch=True)
        neighbors = torch.randint(0, n_bank, (16, 4), generator=torch.Generator().manual_seed(n_bank))
        for group in placed.groups(neighbors, [1, 2]):
            for layer in (1, 2):
                assert group.banks[layer].shape[0] <= 8
        assert all(buffer.numel() <= budget for buffer in placed._buffers.values())
        placed.close()


def test_out_of_range_neighbours_are_refused():
    placed = StreamedRows({1: PatchRows(torch.zeros(5, 2, 2, 4))}, [1], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        list(placed.groups(torch.tensor([[0, 5]]), [1]))


def test_forced_device_placement_over_its_budget_says_how_to_fix_it(tmp_path):
    bank = NormalMemoryBank.load(saved_bank(tmp_path))
    with pytest.raises(ValueError, match=r"memory\.placement=auto or stream"):
        RowPlacement("device", device_budget=100).place(bank.patches, LAYERS, "cpu")


def test_settings_give_the_placement_and_bad_values_are_refused():
    settings = NormalMemorySettings(placement="stream", device_budget="16GiB", stream_budget="256MiB")
    assert RowPlacement.of(settings) == RowPlacement("stream", 16 * 2**30, 256 * 2**20)
    assert RowPlacement.of(NormalMemorySettings()).mode == "auto"
    for bad in (
        {"placement": "gpu"},
        {"device_budget": "lots"},
        {"stream_budget": "-1GiB"},
        {"stream_budget": 0},
    ):
        with pytest.raises(ValueError, match="memory\\."):
            RowPlacement.of(NormalMemorySettings(**bad))


def test_placement_is_not_part_of_the_banks_identity():
    encoder = tiny_encoder()
    plain = NormalMemorySettings().build_settings(encoder)
    assert NormalMemorySettings(placement="device", stream_budget="1GiB").build_settings(encoder) == plain


def test_only_the_scored_layers_are_placed(tmp_path):
    bank = NormalMemoryBank.load(saved_bank(tmp_path), mmap=False)
    bank.placement = RowPlacement("device")
    model = RAD(
        tiny_encoder(), SpatialRetrieval(k=3, rho=1), AnomalyMapper(32, 1.0, kernel_size=5), layers=[3]
    )
    model.attach_memory(bank, {})
    model._bank_to_device()
    assert model.bank.placed.layers == (3,)
    assert model.retrieval_settings()["memory_placement"] == "device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_device_and_streamed_rows_score_alike_and_device_rows_need_no_host_sync(tmp_path):
    path = saved_bank(tmp_path)
    results = {}
    for name in ("device", "stream"):
        bank = NormalMemoryBank.load(path)
        bank.placement = RowPlacement(name)
        model = RAD(tiny_encoder(), SpatialRetrieval(k=5, rho=1), AnomalyMapper(32, 1.0, kernel_size=5))
        model.attach_memory(bank, {})
        model = model.cuda()
        model._bank_to_device()
        query = features(6, seed=2).to("cuda")
        if name == "device":
            torch.cuda.set_sync_debug_mode("error")
            try:
                results[name] = model.score(query).patch_scores
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            results[name] = model.score(query).patch_scores
    assert torch.equal(results["device"], results["stream"])
