"""The MRAD-TF demo's bank and results did not change when the method platform landed.

``tests/golden/demo_mrad_tf.json`` holds the bank tensors (sha256 of their bytes) and every metric of the
demo as computed before the refactor. The demo's images are generated at the encoder's input size, so
no mask or image is resized and nothing but the code under test can move these numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anomret.pipeline import run

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "demo_mrad_tf.json").read_text())


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _projection(tensor: torch.Tensor) -> float:
    """The tensor's values against a fixed seeded random vector: any change of any value moves it."""
    weights = torch.randn(tensor.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return float(tensor.double().flatten() @ weights)


def test_demo_bank_and_results_are_bit_identical_to_before_the_platform(compose_config, tmp_path):
    bank_path = tmp_path / "bank.safetensors"
    result = run(compose_config(["+experiment=demo", f"memory.path={bank_path}"]), fit=True)
    bank = load_file(bank_path)
    assert sorted(bank) == sorted(GOLDEN["bank"])
    for name, expected in GOLDEN["bank"].items():
        tensor = bank[name]
        assert list(tensor.shape) == expected["shape"] and str(tensor.dtype) == expected["dtype"]
        assert _projection(tensor) == pytest.approx(expected["projection"], abs=1e-4), name
    hashes = {name: _sha256(tensor) for name, tensor in bank.items()}
    # On a machine the pre-platform code ran on, bank and metrics are bit-identical to its record; float32
    # kernels round differently on other CPUs, where the metrics must agree to a small tolerance.
    exact = [record for record in GOLDEN["records"] if record["sha256"] == hashes]
    record, tolerance = (exact[0], 0.0) if exact else (GOLDEN["records"][0], 2e-5)
    for category, values in record["categories"].items():
        for metric, value in values.items():
            got = result.per_category[category].get(metric, result.counts[category].get(metric))
            assert got == pytest.approx(value, abs=tolerance), (category, metric)
    for metric, value in record["mean"].items():
        assert result.mean[metric] == pytest.approx(value, abs=tolerance), metric
