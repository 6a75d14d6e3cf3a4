import pytest
import torch
import torch.nn.functional as F

from anomret.memory.labeled import LabeledBankBuilder, LabeledMemoryBank, patch_cell_labels, region_prototypes


def test_cells_follow_bilinear_centre_sampling_and_drop_boundaries():
    # 8x8 mask, 4x4 grid (patch 2): bilinear samples the 2x2 centre of each patch; a patch that is
    # half covered gives 0.5 and is neither anomalous nor normal.
    mask = torch.zeros(1, 8, 8)
    mask[0, 0:2, 0:2] = 1  # cell (0, 0) fully anomalous
    mask[0, 4:6, 5:6] = 1  # cell (2, 2) half covered -> boundary
    anomalous, normal = patch_cell_labels(mask, (4, 4))
    assert anomalous[0].nonzero().tolist() == [[0, 0]]
    assert not normal[0, 0, 0] and not normal[0, 2, 2] and not anomalous[0, 2, 2]
    assert int(normal.sum()) == 14


def test_region_prototypes_hand_worked():
    patches = torch.zeros(2, 2, 2, 3)
    patches[0, 0, 0] = torch.tensor([2.0, 0.0, 0.0])  # anomalous cell
    patches[0, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    patches[0, 1, 0] = torch.tensor([0.0, 3.0, 0.0])
    patches[0, 1, 1] = torch.tensor([0.0, 2.0, 0.0])
    patches[1] = torch.tensor([0.0, 0.0, 5.0])  # normal image
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1
    keys, values = region_prototypes(patches, masks)
    # image 0: anomalous proto = normalise([2,0,0]); normal proto = normalise(mean of [0,1,0],[0,3,0],[0,2,0])
    # image 1: one normal proto
    torch.testing.assert_close(keys, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    torch.testing.assert_close(values, torch.tensor([[0.0, 1], [1, 0], [1, 0]]))


def test_averaging_happens_before_normalisation():
    patches = torch.tensor([[[[1.0, 0.0], [0.0, 10.0]]]])  # 1x1x2 grid, two cells of very different norms
    keys, _ = region_prototypes(patches, torch.zeros(1, 2, 4))
    torch.testing.assert_close(keys, F.normalize(torch.tensor([[0.5, 5.0]]), dim=-1))


def test_builder_counts_subsampling_and_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    builder = LabeledBankBuilder(layer=0, max_patch_entries=3, seed=7)
    masks = torch.zeros(4, 8, 8)
    masks[2, 2:6, 2:6] = 1
    masks[3, 0:4, 0:4] = 1
    labels = torch.tensor([0, 0, 1, 1])
    builder.add_arrays(
        torch.randn(4, 5, generator=gen),
        torch.randn(4, 4, 4, 6, generator=gen),
        masks,
        labels,
        torch.arange(4),
    )
    assert builder.n_images == 4
    bank = builder.build({"source": "unit"})
    assert bank.image_keys.shape == (4, 5)
    torch.testing.assert_close(bank.image_keys.norm(dim=-1), torch.ones(4))
    assert bank.image_values[:, 1].tolist() == [0, 0, 1, 1]
    assert bank.patch_keys.shape == (3, 6)  # 2 + 2*2 = 6 prototypes, subsampled to 3
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = LabeledMemoryBank.load(path)
    torch.testing.assert_close(loaded.patch_keys, bank.patch_keys)
    assert loaded.metadata["source"] == "unit"


def test_empty_bank_is_an_error():
    with pytest.raises(ValueError, match="no auxiliary images"):
        LabeledBankBuilder(layer=0).build()


def test_merged_states_keep_each_image_once_in_dataset_order():
    gen = torch.Generator().manual_seed(1)
    cls, patches = torch.randn(4, 5, generator=gen), torch.randn(4, 2, 2, 6, generator=gen)
    masks, labels = torch.zeros(4, 4, 4), torch.zeros(4, dtype=torch.long)
    single = LabeledBankBuilder(layer=0)
    single.add_arrays(cls, patches, masks, labels, torch.arange(4))
    # Two processes with a padded share: rank 1 repeats image 0.
    rank0, rank1 = LabeledBankBuilder(layer=0), LabeledBankBuilder(layer=0)
    rank0.add_arrays(cls[[0, 2]], patches[[0, 2]], masks[:2], labels[:2], torch.tensor([0, 2]))
    rank1.add_arrays(cls[[1, 3, 0]], patches[[1, 3, 0]], masks[:3], labels[:3], torch.tensor([1, 3, 0]))
    merged = LabeledBankBuilder(layer=0)
    merged.load_states([rank0.state(), rank1.state()])
    for name, tensor in single.state().items():
        torch.testing.assert_close(merged.state()[name], tensor)
