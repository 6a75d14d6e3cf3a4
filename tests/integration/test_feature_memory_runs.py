"""The in-memory feature tier in runs: the jobs of a process reuse the encoder's work, DataLoader workers
leave held images undecoded, and no number moves."""

from __future__ import annotations

import json
import logging

import anomret.data.dataset as dataset_module
from anomret.pipeline import run

from .cli import run_cli

RAD = ["+experiment=demo_rad", "logger=none", "callbacks.overlays.n_per_category=0"]


def test_later_runs_in_the_process_encode_nothing_and_workers_decode_no_held_image(
    compose_config, tmp_path, monkeypatch, caplog
):
    decoded = tmp_path / "decoded.txt"
    read_image = dataset_module.read_image

    def recorded(path):  # forked workers inherit it; each appends to the file
        with decoded.open("a") as log:
            log.write(f"{path}\n")
        return read_image(path)

    monkeypatch.setattr(dataset_module, "read_image", recorded)
    workers = [*RAD, "data.num_workers=2"]
    first = run(compose_config(workers), fit=True)
    assert any("/test/" in line for line in decoded.read_text().splitlines())
    decoded.unlink()
    with caplog.at_level(logging.INFO, logger="anomret"):
        again = run(compose_config(workers), fit=True)
        other_k = run(compose_config([*workers, "retrieval.k=4"]), fit=True)
    # The bank is cached and every test image's features are held: nothing decoded, nothing encoded.
    assert not decoded.exists(), decoded.read_text()
    assert caplog.text.count("features: 0 image(s) encoded, 42 reused from memory") == 2
    assert again.per_category == first.per_category  # bit for bit
    assert other_k.settings["retrieval"]["k_used"] == 4

    off = ["features.memory.host=0", "features.memory.device=0"]
    assert run(compose_config([*RAD, *off]), fit=True).per_category == first.per_category
    alone = run(compose_config([*RAD, *off, "retrieval.k=4"]), fit=True)
    assert alone.per_category == other_k.per_category


def test_a_sweep_as_typed_encodes_the_test_images_once(tmp_path, data_dir):
    result = run_cli(
        ["-m", "anomret.train", "-m", *RAD, "retrieval.k=2,8", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path,
        data_dir=data_dir,
    )
    output = result.stdout + result.stderr
    assert "features: 72 image(s) encoded" in output  # job 0: 30 memory images, 42 test images
    assert "features: 0 image(s) encoded, 42 reused from memory" in output  # job 1
    single = tmp_path / "single"
    run_cli(
        ["-m", "anomret.train", *RAD, "retrieval.k=8", f"hydra.run.dir={single}"],
        tmp_path,
        data_dir=data_dir,
    )
    swept = json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())
    assert swept["categories"] == json.loads((single / "results.json").read_text())["categories"]
