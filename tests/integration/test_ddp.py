"""Correct under DDP, tested with two real CPU processes (gloo), as lightning-hydra-template's ddp_sim.

- bank building: every process's features are gathered exactly once and every process ends with the
  bank a single process builds;
- evaluation: every process reports the single-process numbers, whatever rows the sampler repeated;
- the entry point: `trainer=ddp_cpu` (two processes) writes the results and bank of a one-process run.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from . import ddp_workers
from .test_train_eval import _cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bank_and_evaluation_gathered_over_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(ddp_workers.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rows = ddp_workers.synthetic_rows()
    n = len(rows["cls"])
    single_bank = ddp_workers.build_bank(rows, list(range(n)), max_patch_entries=5).build({})
    single_result = ddp_workers.evaluate(rows, list(range(n))).compute().to_dict()
    # The padded shares really repeat a row, so deduplication is exercised.
    shares = ddp_workers.rank_shares(n, 2)
    assert sum(len(s) for s in shares) > n
    for rank in (0, 1):
        bank = torch.load(tmp_path / f"bank{rank}.pt", weights_only=True)
        for name, tensor in bank.items():
            torch.testing.assert_close(tensor, getattr(single_bank, name), rtol=0, atol=0)
        assert json.loads((tmp_path / f"result{rank}.json").read_text()) == json.loads(
            json.dumps(single_result)
        )


@pytest.mark.slow
def test_train_with_two_ddp_processes_matches_one_process(tmp_path, data_dir):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for root, extra in ((single, []), (ddp, ["trainer=ddp_cpu"])):
        root.mkdir()
        _cli("anomret.train", ["+experiment=demo", "logger=none", *extra], root, data_dir)
    results = {}
    for root in (single, ddp):
        (run_dir,) = (root / "logs" / "demo" / "train").iterdir()
        results[root] = json.loads((run_dir / "results.json").read_text())
        artifacts = json.loads((run_dir / "artifacts.json").read_text())
        results[root]["bank"] = load_file(artifacts["bank"])
    one, two = results[single], results[ddp]
    for category, values in one["categories"].items():
        assert two["categories"][category]["n_images"] == values["n_images"] == 14  # not one rank's half
        for metric in one["metrics"]:
            assert two["categories"][category][metric] == pytest.approx(values[metric], abs=1e-6)
    # Batches are split differently across processes, so the encoder may round differently in the last bit.
    for name, tensor in one["bank"].items():
        torch.testing.assert_close(two["bank"][name], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_multirun_whose_jobs_use_ddp_runs_each_job_once_in_its_own_directory(tmp_path, data_dir):
    # As a user types it: no hydra.sweep.dir, from a fresh working directory.
    out = _cli(
        "anomret.train",
        ["-m", "+experiment=demo", "trainer=ddp_cpu", "logger=none", "model.image_score_weight=0.5,1.0"],
        tmp_path,
        data_dir,
    )
    assert out.stdout.count("Launching") <= 1 and "Launching 2 jobs" in out.stdout + out.stderr
    (sweep,) = (tmp_path / "logs" / "demo" / "train-multirun").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    weights = []
    for job in jobs:
        results = json.loads((sweep / job / "results.json").read_text())
        assert all(values["n_images"] == 14 for values in results["categories"].values())
        weights.append(
            float((sweep / job / "config.yaml").read_text().split("image_score_weight:")[1].split()[0])
        )
    assert weights == [0.5, 1.0]
    # The DDP processes did not start sweeps or single runs of their own.
    assert sorted(p.name for p in (tmp_path / "logs" / "demo").iterdir()) == ["train-multirun"]
