"""MRAD-FT projection heads: official layout, retrieval formula, dropout in training, cached keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomret.memory.labeled import LabeledMemoryBank
from anomret.models.projections import MRADProjectionHeads, ProjectedMemory, QueryKeyProjection
from anomret.retrieval.softmax import SoftmaxRetriever, projected_retrieve

PATCH_DIM, IMAGE_DIM, OUT_DIM = 12, 8, 14


def _bank(seed: int = 0, m: int = 17, n: int = 9) -> LabeledMemoryBank:
    gen = torch.Generator().manual_seed(seed)
    return LabeledMemoryBank(
        image_keys=F.normalize(torch.randn(n, IMAGE_DIM, generator=gen), dim=-1),
        image_values=F.one_hot(torch.arange(n) % 2, 2).float(),
        patch_keys=F.normalize(torch.randn(m, PATCH_DIM, generator=gen), dim=-1),
        patch_values=F.one_hot((torch.arange(m) % 3 == 0).long(), 2).float(),
    )


def _queries(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, PATCH_DIM, generator=gen) * 5, torch.randn(2, IMAGE_DIM, generator=gen) * 5


def test_official_layout_and_parameter_counts():
    heads = MRADProjectionHeads()
    assert (heads.patch.query.in_features, heads.patch.query.out_features) == (1024, 768)
    assert (heads.image.key.in_features, heads.image.key.out_features) == (768, 768)
    assert sum(p.numel() for p in heads.patch.parameters()) == 1_574_400
    assert sum(p.numel() for p in heads.image.parameters()) == 1_181_184
    assert heads.patch_drop_ratio == 0.2 and heads.image_drop_ratio == 0.05 and heads.tau == 1.0
    # Separate (asymmetric) query and key maps, default init.
    assert not torch.equal(heads.patch.query.weight, heads.patch.key.weight)
    assert sorted(heads.state_dict()) == sorted(
        f"{level}.{role}.{p}"
        for level in ("patch", "image")
        for role in ("query", "key")
        for p in ("weight", "bias")
    )


def test_identity_heads_reproduce_the_train_free_retrieval():
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM, identity=True).eval()
    bank = _bank()
    patches, images = _queries()
    retriever = SoftmaxRetriever()
    torch.testing.assert_close(
        heads.patch_scores(patches, bank), retriever(patches, bank.patch_keys, bank.patch_values)[..., 1]
    )
    torch.testing.assert_close(
        heads.image_scores(images, bank), retriever(images, bank.image_keys, bank.image_values)[..., 1]
    )
    with pytest.raises(ValueError, match="no identity map"):
        QueryKeyProjection(8, 4).identity_()


def test_retrieval_matches_the_formula():
    torch.manual_seed(0)
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM).eval()
    bank = _bank()
    patches, images = _queries()
    q = F.normalize(patches.double(), dim=-1)
    wq, bq = heads.patch.query.weight.double(), heads.patch.query.bias.double()
    wk, bk = heads.patch.key.weight.double(), heads.patch.key.bias.double()
    logits = (q @ wq.T + bq) @ (bank.patch_keys.double() @ wk.T + bk).T  # not re-normalised, τ = 1
    expected = torch.softmax(logits, dim=-1) @ bank.patch_values.double()
    got = heads.retrieve_patches(patches, bank)
    assert got.shape == (2, 3, 4, 2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert heads.patch_scores(patches, bank).shape == (2, 3, 4)
    assert heads.image_scores(images, bank).shape == (2,)


def test_dropout_follows_training_mode_unless_told():
    torch.manual_seed(1)
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM, patch_drop_ratio=0.3, image_drop_ratio=0.25)
    bank = _bank()
    patches, images = _queries()
    q = F.normalize(patches, dim=-1)
    keys_proj = heads.patch.key(bank.patch_keys)
    with torch.no_grad():
        masked = projected_retrieve(
            q, bank.patch_keys, heads.patch.query(q), keys_proj, bank.patch_values, drop_ratio=0.3
        )
        unmasked = projected_retrieve(q, bank.patch_keys, heads.patch.query(q), keys_proj, bank.patch_values)
        heads.train()
        torch.testing.assert_close(heads.retrieve_patches(patches, bank), masked)
        torch.testing.assert_close(heads.retrieve_patches(patches, bank, dropout=False), unmasked)
        heads.eval()
        torch.testing.assert_close(heads.retrieve_patches(patches, bank), unmasked)
        torch.testing.assert_close(heads.retrieve_patches(patches, bank, dropout=True), masked)
        assert not torch.allclose(masked, unmasked)
        qi = F.normalize(images, dim=-1)
        image_masked = projected_retrieve(
            qi,
            bank.image_keys,
            heads.image.query(qi),
            heads.image.key(bank.image_keys),
            bank.image_values,
            drop_ratio=0.25,
        )
        torch.testing.assert_close(heads.retrieve_images(images, bank, dropout=True), image_masked)


def test_cached_key_projections_equal_per_batch_projection():
    torch.manual_seed(2)
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM).eval()
    bank = _bank()
    patches, images = _queries()
    cached = heads.project_keys(bank)
    assert isinstance(cached, ProjectedMemory) and cached.patch_keys_proj.shape == (17, OUT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            heads.retrieve_patches(patches, cached), heads.retrieve_patches(patches, bank)
        )
        torch.testing.assert_close(heads.retrieve_images(images, cached), heads.retrieve_images(images, bank))
    # While the key maps train, a cache would silently cut their gradient: refused.
    with pytest.raises(RuntimeError, match="no gradient"):
        heads.retrieve_patches(patches, cached)
    heads.requires_grad_(False)
    heads.retrieve_patches(patches, cached)  # frozen heads (MRAD-CLIP's priors) may use the cache


def test_gradients_reach_both_projections_of_both_levels():
    torch.manual_seed(3)
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM).train()
    bank = _bank()
    patches, images = _queries()
    loss = heads.patch_scores(patches, bank).mean() + heads.retrieve_images(images, bank)[:, 1].sum()
    loss.backward()
    for projection in (heads.patch, heads.image):
        for linear in (projection.query, projection.key):
            assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_bad_inputs_are_rejected():
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM)
    bank = _bank()
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        heads.retrieve_patches(torch.randn(3, PATCH_DIM), bank)
    with pytest.raises(ValueError, match="input dimension"):
        heads.retrieve_images(torch.randn(3, PATCH_DIM), bank)
    with pytest.raises(ValueError, match="patch_drop_ratio"):
        MRADProjectionHeads(patch_drop_ratio=1.0)
