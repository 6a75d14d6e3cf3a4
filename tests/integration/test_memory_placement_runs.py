"""Placements of RAD's memory rows end to end: through the Triton kernel (its interpreter on CPU) and in
runs under DDP; every placement reads the same bank file and gives the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anomret
from anomret.memory.rows import PatchRows
from anomret.retrieval.spatial import multilayer_spatial_knn_scores

from .cli import run_cli

_KERNEL_RUN = """
import sys, torch
from anomret.memory.placement import RowPlacement
from anomret.memory.rows import PatchRows
from anomret.retrieval.spatial import multilayer_spatial_knn_scores
from anomret.retrieval.spatial_triton import INTERPRETED

assert INTERPRETED, "TRITON_INTERPRET=1 did not reach the kernel"
patches, query, neighbors, placements = torch.load(sys.argv[1])
out = {}
for name, settings in placements.items():
    placed = RowPlacement(**settings).place({layer: PatchRows(rows) for layer, rows in patches.items()}, [1, 2], "cpu")
    parts = [
        multilayer_spatial_knn_scores(
            {layer: q[group.queries] for layer, q in query.items()}, group.banks, group.neighbors, 1,
            backend="triton",
        )
        for group in placed.groups(neighbors, [1, 2])
    ]
    out[name] = torch.cat(parts)
torch.save(out, sys.argv[2])
"""


def test_the_kernel_reads_device_and_streamed_rows_alike(tmp_path):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    # Unit vectors, as a built bank stores (rows are checked for it when first read).
    patches = {
        layer: torch.nn.functional.normalize(torch.randn(12, 3, 4, 16, generator=gen), dim=-1).half()
        for layer in (1, 2)
    }
    query = {layer: torch.randn(5, 3, 4, 16, generator=gen) for layer in (1, 2)}
    neighbors = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(5)])
    row_bytes = 3 * 4 * 16 * 2
    placements = {  # RowPlacement settings
        "device": {"mode": "device"},
        "stream": {"mode": "stream"},
        "stream, groups, prefetched": {"mode": "stream", "stream_budget": 6 * row_bytes, "prefetch": True},
    }
    torch.save((patches, query, neighbors, placements), tmp_path / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(anomret.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _KERNEL_RUN, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    for name in placements:
        assert torch.equal(out[name], out["device"]), name
    rows = {layer: PatchRows(values).stored() for layer, values in patches.items()}
    torch_path = multilayer_spatial_knn_scores(query, rows, neighbors, 1, backend="torch")
    torch.testing.assert_close(out["device"], torch_path, rtol=0, atol=2e-6)


def test_placements_under_ddp_read_one_bank_and_agree(tmp_path, data_dir):
    common = ["+experiment=demo_rad", "logger=none", "callbacks.overlays.n_per_category=0"]
    built = tmp_path / "built"
    run_cli(["-m", "anomret.train", *common, f"hydra.run.dir={built}"], tmp_path, data_dir=data_dir)
    bank = json.loads((built / "artifacts.json").read_text())["bank"]
    one = json.loads((built / "results.json").read_text())
    assert one["settings"]["retrieval"]["memory_placement"] == "stream"  # auto, CPU, memory-mapped
    results = {}
    for name, extra in (
        ("device", ["memory.placement=device"]),
        ("stream, one image per group", ["memory.placement=stream", "memory.stream_budget=1"]),
    ):
        run_dir = tmp_path / name.replace(" ", "_").replace(",", "")
        overrides = [*common, "trainer=ddp_cpu", f"memory.path={bank}", *extra, f"hydra.run.dir={run_dir}"]
        run_cli(
            ["-m", "anomret.eval", *overrides],
            tmp_path,
            data_dir=data_dir,
        )
        results[name] = json.loads((run_dir / "results.json").read_text())
        assert results[name]["settings"]["retrieval"]["memory_placement"] == extra[0].split("=")[1]
    device, stream = results["device"]["categories"], results["stream, one image per group"]["categories"]
    assert device == stream  # the same features in the same processes: identical, whatever the placement
    for category, values in one["categories"].items():
        for metric in one["metrics"]:
            assert device[category][metric] == pytest.approx(values[metric], abs=1e-6)
