"""Weights resolution: random/file/tag classification, file identity, fast offline failures."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from anomret.encoders import weights as weights_module
from anomret.encoders.timm_vit import TimmViTEncoder
from anomret.encoders.weights import WeightsUnavailableError, file_identity, resolve_weights

TINY = {
    "model_name": "vit_base_patch16_dinov3",
    "layers": [1],
    "image_size": 32,
    "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
}


def test_resolve_classifies_values(tmp_path):
    assert resolve_weights(None, encoder_name="e").kind == "random"
    assert resolve_weights("null", encoder_name="e", seed=4).identity() == {"kind": "random", "seed": 4}
    assert resolve_weights("openai", encoder_name="e").identity() == {"kind": "tag", "tag": "openai"}
    # A hub repo id has a slash but is still a tag.
    assert resolve_weights("timm/vit_base_patch16_dinov3.lvd1689m", encoder_name="e").kind == "tag"
    path = tmp_path / "w.bin"
    torch.save({"a": torch.ones(1)}, path)
    assert resolve_weights(str(path), encoder_name="e").kind == "file"
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pt"), encoder_name="e")
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(WeightsUnavailableError, match="not a weights file"):
        resolve_weights(str(text), encoder_name="e")


def test_file_identity_sees_changes_in_head_and_tail(tmp_path):
    path = tmp_path / "big.bin"
    data = bytearray(3 * (1 << 20))
    path.write_bytes(bytes(data))
    first = file_identity(path)
    data[-1] = 1
    path.write_bytes(bytes(data))
    assert file_identity(path)["sha256_head_tail"] != first["sha256_head_tail"]
    assert first["size"] == len(data)


@pytest.fixture
def connections(monkeypatch) -> list[object]:
    """Every socket connection attempted while the test runs (a retry loop would make several)."""
    attempts: list[object] = []
    connect = socket.socket.connect

    def counted(self, address):
        attempts.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    return attempts


def _assert_clear_failure(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "vit_base_patch16_dinov3.lvd1689m" in message
    assert "encoder.pretrained=/path/to/weights.safetensors" in message
    assert "HF_HOME" in message and "encoder.cache_dir" in message


def test_tag_fails_without_a_connection_when_hub_offline(monkeypatch, tmp_path, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as error:
        TimmViTEncoder(**TINY, pretrained="lvd1689m", cache_dir=str(tmp_path))
    _assert_clear_failure(error)
    assert connections == []
    assert "HF_HUB_OFFLINE" in str(error.value)


def test_tag_fails_after_one_attempt_when_hub_unreachable(monkeypatch, tmp_path, connections):
    from huggingface_hub import constants

    # Not offline by configuration, but the endpoint refuses connections (a closed local port):
    # the probe must fail once, without the hub client's retry loop.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailableError) as error:
        TimmViTEncoder(**TINY, pretrained="lvd1689m", cache_dir=str(tmp_path))
    _assert_clear_failure(error)
    assert len(connections) == 1, connections
    assert "unreachable" in str(error.value)


def test_tag_is_read_from_hub_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = TimmViTEncoder(**TINY, seed=5)
    snapshot = tmp_path / "models--timm--vit_base_patch16_dinov3.lvd1689m" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(dict(source.model.state_dict()), str(snapshot / "model.safetensors"))

    loaded = TimmViTEncoder(**TINY, pretrained="lvd1689m", cache_dir=str(tmp_path))
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(images).cls, source(images).cls)
    assert loaded.fingerprint()["weights"] == {"kind": "tag", "tag": "lvd1689m"}


def test_hub_offline_reads_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_module.hub_offline()
