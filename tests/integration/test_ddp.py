"""Correct under DDP, tested with two real CPU processes (gloo), as lightning-hydra-template's ddp_sim.

- bank building: every process's features are gathered exactly once and every process ends with the
  bank a single process builds;
- evaluation: every process reports the single-process numbers, whatever rows the sampler repeated;
- the entry point: `trainer=ddp_cpu` (two processes) writes the results and bank of a one-process run;
- MRAD-FT / MRAD-CLIP training: both processes end with the same trained parameters, the checkpoint holds
  them, and `anomret.eval` of it, in one process or two, reproduces the DDP run's results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from anomret.models.checkpoint import load_checkpoint

from . import ddp_workers
from .cli import free_port, run_cli


def test_bank_and_evaluation_gathered_over_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(ddp_workers.worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
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


def test_train_with_two_ddp_processes_matches_one_process(tmp_path, data_dir):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for root, extra in ((single, []), (ddp, ["trainer=ddp_cpu"])):
        root.mkdir()
        run_cli(["-m", "anomret.train", "+experiment=demo", "logger=none", *extra], root, data_dir=data_dir)
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


def test_multirun_whose_jobs_use_ddp_runs_each_job_once_in_its_own_directory(tmp_path, data_dir):
    # As a user types it: no hydra.sweep.dir, from a fresh working directory.
    out = run_cli(
        [
            "-m",
            "anomret.train",
            "-m",
            "+experiment=demo",
            "trainer=ddp_cpu",
            "logger=none",
            "model.score.retrieval_weight=0.5,1.0",
        ],
        tmp_path,
        data_dir=data_dir,
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
            float((sweep / job / "config.yaml").read_text().split("retrieval_weight:")[1].split()[0])
        )
    assert weights == [0.5, 1.0]
    # The DDP processes did not start sweeps or single runs of their own.
    assert sorted(p.name for p in (tmp_path / "logs" / "demo").iterdir()) == ["train-multirun"]


@pytest.mark.parametrize("name", ["ft", "clip"])
def test_trained_demo_under_ddp_keeps_the_processes_equal_and_eval_reproduces_it(
    name, tmp_path, data_dir, monkeypatch
):
    # The processes Lightning starts import the dump callback from this test package.
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    dumps = tmp_path / "dumps"
    experiment = f"+experiment=demo_mrad_{name}"
    run_cli(
        [
            "-m",
            "anomret.train",
            experiment,
            "logger=none",
            "trainer=ddp_cpu",
            f"hydra.run.dir={tmp_path / 'train'}",
            "+callbacks.state_dump._target_=tests.integration.ddp_workers.TrainedStateDump",
            f"+callbacks.state_dump.directory={dumps}",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    artifacts = json.loads((tmp_path / "train" / "artifacts.json").read_text())
    checkpoint = load_checkpoint(artifacts["checkpoint"])
    assert Path(artifacts["checkpoint"]).stat().st_size < 400_000  # the small checkpoint, one file
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == ["last.ckpt"]

    state = {
        (rank, moment): torch.load(dumps / f"rank{rank}-{moment}.pt")
        for rank in (0, 1)
        for moment in ("start", "end")
    }
    trained = checkpoint["state_dict"]
    learned = {"ft": ("heads.",), "clip": ("heads.", "prompts.")}[name]
    assert {k for k in trained if k.startswith(learned)} == {
        k for k in state[0, "end"] if k.startswith(learned)
    }
    for key in (k for k in trained if k.startswith(learned)):
        # Both processes start from the same parameters and end with the same ones, bit for bit: the
        # averaged gradients step them alike. That end is what rank 0 wrote to the checkpoint.
        assert torch.equal(state[0, "start"][key], state[1, "start"][key]), key
        assert torch.equal(state[0, "end"][key], state[1, "end"][key]), key
        assert torch.equal(trained[key], state[0, "end"][key]), key
    for prefix in learned:  # and training did move every trained part
        assert any(
            not torch.equal(state[0, "start"][k], state[0, "end"][k]) for k in trained if k.startswith(prefix)
        ), prefix

    run_cli(
        [
            "-m",
            "anomret.eval",
            experiment,
            "logger=none",
            f"ckpt_path={artifacts['checkpoint']}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    ddp = json.loads((tmp_path / "train" / "results.json").read_text())
    single = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert json.loads((tmp_path / "eval" / "artifacts.json").read_text())["bank"] == artifacts["bank"]
    assert list(single["categories"]) == list(ddp["categories"])
    for category, values in single["categories"].items():
        assert ddp["categories"][category]["n_images"] == values["n_images"] == 14  # not one rank's half
        # The processes scored differently composed batches: the last float bit may differ.
        for metric in single["metrics"]:
            assert ddp["categories"][category][metric] == pytest.approx(values[metric], abs=1e-6), metric

    # Evaluated under DDP (plain ddp: nothing trains, so MRAD-CLIP needs no unused-parameter detection),
    # the processes split the images as the training run's test pass did: the same numbers exactly.
    run_cli(
        [
            "-m",
            "anomret.eval",
            experiment,
            "logger=none",
            "trainer=ddp_cpu",
            f"ckpt_path={artifacts['checkpoint']}",
            f"hydra.run.dir={tmp_path / 'eval_ddp'}",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    assert json.loads((tmp_path / "eval_ddp" / "results.json").read_text())["categories"] == ddp["categories"]
