"""Runs with the feature store: the encoder runs once per image, the numbers do not move."""

from __future__ import annotations

import logging

import pytest

from anomret.pipeline import run


def test_second_run_reads_every_feature_from_the_store_with_identical_results(
    compose_config, tmp_path, caplog
):
    with caplog.at_level(logging.INFO, logger="anomret.pipeline"):
        plain = run(compose_config(["+experiment=demo"]), fit=True)
    assert (
        "features: 84 image(s) encoded (feature store off: features.enabled=true caches them)" in caplog.text
    )
    caplog.clear()
    store = ["+experiment=demo", "features.enabled=true", "features.dtype=fp32"]
    with caplog.at_level(logging.INFO, logger="anomret.pipeline"):
        cold = run(compose_config(store), fit=True)
        # 42 memory images for the bank (built from rounded features: its own cache entry), 42 test images.
        assert "features: 84 image(s) encoded, 0 read from the feature store" in caplog.text
        caplog.clear()
        warm = run(compose_config(store), fit=True)
        # The bank is cached and every test image is in the store: the encoder never runs.
        assert "features: 0 image(s) encoded, 42 read from the feature store" in caplog.text
    assert cold.per_category == plain.per_category == warm.per_category  # fp32: bit-exact
    assert list((tmp_path / ".cache" / "features").iterdir()), "entries live under paths.cache_dir/features"


def test_fp16_store_moves_metrics_by_rounding_only(compose_config):
    plain = run(compose_config(["+experiment=demo"]), fit=True)
    half = run(compose_config(["+experiment=demo", "features.enabled=true"]), fit=True)
    for category, values in plain.per_category.items():
        for metric, value in values.items():
            assert half.per_category[category][metric] == pytest.approx(value, abs=0.02), (category, metric)


def test_two_concurrent_jobs_sharing_the_cache_both_finish_with_the_same_numbers(tmp_path, data_dir):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ANOMRET_DATA_DIR": str(data_dir), "ANOMRET_CACHE_DIR": str(tmp_path / "cache")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    jobs = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        command = [
            sys.executable,
            "-m",
            "anomret.train",
            "+experiment=demo",
            "features.enabled=true",
            "logger=none",
        ]
        jobs.append(
            (
                workdir,
                subprocess.Popen(
                    command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                ),
            )
        )
    results = []
    for workdir, process in jobs:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output.decode()[-3000:]
        (path,) = (workdir / "logs").rglob("results.json")
        results.append(json.loads(path.read_text())["categories"])
    assert results[0] == results[1]
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no half-written entry or bank is left"
    assert len(list((tmp_path / "cache" / "banks").glob("*.safetensors"))) == 1
