"""A calibrated run exported as a model package, used as users would: ``anomret.predict package=``,
``anomret.load(OUT).predict(images)``, and ``anomret.serve`` answering real HTTP requests on loopback."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .cli import free_port, run_cli


@pytest.fixture(scope="module")
def package(tmp_path_factory, data_dir) -> Path:
    work = tmp_path_factory.mktemp("package")
    run_dir = work / "run"
    run_cli(
        ["-m", "anomret.train", "+experiment=demo", "calibration=normal_holdout", f"hydra.run.dir={run_dir}"],
        work,
        data_dir=data_dir,
    )
    out = work / "demo_package"
    result = run_cli(["-m", "anomret.export", str(run_dir), str(out), "--onnx"], work)
    assert f"python -m anomret.predict package={out}" in result.stdout
    return out


def _images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "synthetic" / "synthetic_a" / "pill" / "test").rglob("*.png"))


def test_the_package_holds_every_file_with_its_digest_and_no_run_paths(package):
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.yaml", "bank.safetensors", "thresholds.json", "model.onnx"}
    assert manifest["method"] == "mrad_tf" and manifest["versions"]["anomret"]
    assert max(manifest["onnx"]["max_abs_diff"].values()) <= 1e-4
    config = (package / "config.yaml").read_text()
    assert "path: bank.safetensors" in config and "/run" not in config


def test_predict_with_a_package_equals_the_python_api(package, data_dir, tmp_path):
    run_cli(
        [
            "-m",
            "anomret.predict",
            f"package={package}",
            f"input={data_dir / 'synthetic' / 'synthetic_a' / 'pill'}",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    rows = list(csv.DictReader(next(tmp_path.glob("logs/*/predict/*/predictions.csv")).open()))
    run = next(tmp_path.glob("logs/*/predict/*"))
    thresholds = json.loads((package / "thresholds.json").read_text())
    assert {row["label"] for row in rows} <= {"anomalous", "normal"}
    for row in rows:
        score = float(row["image_score"])
        assert row["label"] == ("anomalous" if score >= thresholds["image"] else "normal")
        assert float(row["threshold"]) == thresholds["image"]
        # The mask PNG is exactly the map at or above the pixel threshold.
        anomaly_map = np.load(run / row["map_file"])
        mask = np.asarray(Image.open(run / row["mask_file"])) > 0
        assert (mask == (anomaly_map >= np.float32(thresholds["pixel"]))).all()

    import anomret

    detector = anomret.load(package, device="cpu")
    by_path = {row["image_path"]: row for row in rows}
    paths = [p for p in _images(data_dir) if str(p) in by_path][:6]
    predictions = detector.predict([Image.open(p) for p in paths])
    for path, prediction in zip(paths, predictions, strict=True):
        assert prediction.score == pytest.approx(float(by_path[str(path)]["image_score"]), abs=1e-6)
        assert prediction.label == by_path[str(path)]["label"]
    # Arrays decide like the PIL images they hold.
    again = detector.predict(np.asarray(Image.open(paths[0]).convert("RGB")))
    assert again[0].score == pytest.approx(predictions[0].score, abs=1e-6)


def test_a_damaged_or_foreign_package_is_refused_with_the_reason(package, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(package, damaged)
    thresholds = json.loads((damaged / "thresholds.json").read_text())
    thresholds["image"] = 0.0
    (damaged / "thresholds.json").write_text(json.dumps(thresholds))
    result = run_cli(
        ["-m", "anomret.predict", f"package={damaged}", f"input={tmp_path}"], tmp_path, check=False
    )
    assert result.returncode == 1
    assert "thresholds.json does not match the package's manifest" in result.stderr
    assert "Traceback" not in result.stderr

    newer = tmp_path / "newer"
    shutil.copytree(package, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format"] = "anomret.package/99"
    (newer / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(["-m", "anomret.serve", str(newer), "--port", "1"], tmp_path, check=False)
    assert result.returncode == 1 and "reads anomret.package/1" in result.stderr

    result = run_cli(
        ["-m", "anomret.predict", f"package={package}", "model.score.top_k_ratio=0.5", f"input={tmp_path}"],
        tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "package= fixes the model" in result.stderr


# ---------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def service(package, tmp_path_factory):
    """``python -m anomret.serve PACKAGE`` as a real process on a free loopback port, always stopped."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        sys.executable,
        "-m",
        "anomret.serve",
        str(package),
        "--port",
        str(port),
        "--max-batch-size",
        "4",
        "--batch-timeout-ms",
        "3000",
        "--max-request-mb",
        "2",
        "--device",
        "cpu",
    ]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(600):
                if process.poll() is not None:
                    raise AssertionError(f"the service exited early:\n{log.read_text()}")
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError(f"the service never became ready:\n{log.read_text()}")
            yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_service_answers_decisions_like_the_python_api(service, package, data_dir):
    import anomret

    path = _images(data_dir)[0]
    expected = anomret.load(package, device="cpu").predict(Image.open(path))[0]
    with httpx.Client(base_url=service, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json()["method"] == "mrad_tf"
        answer = client.post(
            "/predict?map=true", files={"image": ("part.png", path.read_bytes(), "image/png")}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert body["label"] == expected.label and body["threshold"] == expected.threshold
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]["data"])))) > 0
    assert (mask == expected.mask).all()
    values = np.frombuffer(base64.b64decode(body["anomaly_map"]["data"]), dtype="<f4")
    assert np.allclose(values.reshape(expected.anomaly_map.shape), expected.anomaly_map, atol=1e-6)


def test_bad_uploads_get_a_4xx_with_the_reason(service, data_dir):
    good = _images(data_dir)[0].read_bytes()
    cases = {
        "not an image": (
            400,
            {"files": {"image": ("a.png", b"hello, not an image", "image/png")}},
            "not an image",
        ),
        "truncated": (400, {"files": {"image": ("a.png", good[: len(good) // 2], "image/png")}}, "truncated"),
        "1x1": (
            400,
            {"files": {"image": ("a.png", _png(Image.new("RGB", (1, 1))), "image/png")}},
            "at least",
        ),
        "50 MP": (
            413,
            {"files": {"image": ("a.png", _png(Image.new("L", (8000, 6250))), "image/png")}},
            "over the limit",
        ),
        "over the size limit": (
            413,
            {"files": {"image": ("a.png", b"\0" * (3 << 20), "image/png")}},
            "bytes",
        ),
        "wrong content type": (415, {"content": good, "headers": {"content-type": "image/png"}}, "multipart"),
        "no image field": (422, {"files": {"picture": ("a.png", good, "image/png")}}, "'image' is missing"),
        "empty": (400, {"files": {"image": ("a.png", b"", "image/png")}}, "empty"),
    }
    with httpx.Client(base_url=service, timeout=60) as client:
        for name, (status, request, reason) in cases.items():
            answer = client.post("/predict", **request)
            assert answer.status_code == status, (name, answer.text)
            assert reason in answer.json()["error"], (name, answer.json())
        assert client.get("/ready").status_code == 200


def test_concurrent_requests_share_a_forward_pass_and_bad_ones_leave_good_ones_answered(service, data_dir):
    paths = _images(data_dir)[:8]

    def good(path: Path) -> int:
        with httpx.Client(base_url=service, timeout=120) as client:
            return client.post(
                "/predict", files={"image": ("p.png", path.read_bytes(), "image/png")}
            ).status_code

    def bad(index: int) -> int:
        with httpx.Client(base_url=service, timeout=120) as client:
            return client.post(
                "/predict", files={"image": ("b.png", b"junk %d" % index, "image/png")}
            ).status_code

    with httpx.Client(base_url=service, timeout=60) as client:
        before = client.get("/stats").json()
    with ThreadPoolExecutor(max_workers=24) as pool:
        good_answers = [pool.submit(good, path) for path in paths]
        bad_answers = [pool.submit(bad, index) for index in range(16)]
        assert [answer.result() for answer in good_answers] == [200] * len(paths)
        assert [answer.result() for answer in bad_answers] == [400] * 16
    with httpx.Client(base_url=service, timeout=60) as client:
        after = client.get("/stats").json()
        assert client.get("/ready").status_code == 200
    assert after["images"] - before["images"] == len(paths)
    # With room for 4 per pass and a 3 s wait for company, 8 concurrent images never take 8 passes.
    assert after["batches"] - before["batches"] < len(paths)
    assert after["largest_batch"] > 1
