"""The report pages of a real few-shot sweep in a headless Chromium, the sweep's last line, the 80-column
console output of a pipe, and the run page logged to W&B.

Chromium is Debian's (``apt-get install chromium``), driven by playwright. Without it the browser tests
are skipped, unless ``ANOMRET_REQUIRE_BROWSER=1`` (CI), where they fail. Screenshots are saved in the
tests' temporary directories and their paths printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anomret.pipeline import run

from .cli import run_cli
from .wandb_records import finished_records

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CATEGORIES = ["weave", "wood", "pill"]


def _browser_or_skip() -> None:
    required = os.environ.get("ANOMRET_REQUIRE_BROWSER") == "1"
    problem = None
    if not CHROMIUM.is_file():
        problem = f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem and required:
        pytest.fail(f"ANOMRET_REQUIRE_BROWSER=1 but {problem}")
    if problem:
        pytest.skip(f"no headless browser: {problem}")


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, str]:
    """A two-job RAD few-shot sweep (retrieval.k=4,8; K=8 is capped at the 6 memory images), its output
    piped as a user's would be, 80 columns wide."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "sweep"
    done = run_cli(
        [
            "-m",
            "anomret.train",
            "-m",
            "+experiment=demo_rad_fewshot",
            "retrieval.k=4,8",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        root,
        data_dir=data_dir,
        env={"COLUMNS": "80"},
    )
    return sweep_dir, done.stdout


def _table_lines(text: str) -> list[str]:
    # Rows of the results tables: a header with I-AUROC, or three or more percentages.
    return [
        line for line in text.splitlines() if "I-AUROC" in line or len(re.findall(r"\d+\.\d\b", line)) >= 3
    ]


def test_sweep_ends_with_its_directory_and_the_report_command(sweep):
    sweep_dir, stdout = sweep
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[-1] == f"sweep finished: {sweep_dir}; report: python -m anomret.report {sweep_dir}"
    assert (sweep_dir / "report.html").is_file() and (sweep_dir / "report.csv").is_file()
    for job in ("0", "1"):
        assert (sweep_dir / job / "report.html").is_file() and (
            sweep_dir / job / "image_scores.csv"
        ).is_file()
        # A job's figures are left to the sweep page; its page names the command that draws them.
        assert f"python -m anomret.report {sweep_dir / job}" in (sweep_dir / job / "report.html").read_text()


def test_console_tables_of_a_piped_sweep_fit_80_columns(sweep):
    _, stdout = sweep
    rows = _table_lines(stdout)
    assert len(rows) >= 2 * (len(CATEGORIES) + 2)  # each job's per-category table, and the sweep's
    assert max(len(line) for line in rows) <= 80, "\n".join(rows)
    for category in CATEGORIES:  # names whole, at the start of their rows
        assert any(line.split()[0] == category for line in rows)
    assert "K = 6 (retrieval.k=8 capped at the memory's 6 images)" in " ".join(stdout.split())


def test_report_command_piped_fits_80_columns_and_imports_no_torch(sweep, tmp_path):
    sweep_dir, _ = sweep
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "anomret.report", str(sweep_dir / "1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        # A path is one word: kept whole on its line even when it is wider than the console.
        if not line.startswith(("wrote ", "report page: ")):
            assert len(line) <= 80, line
    assert all(any(line.split()[:1] == [c] for line in done.stdout.splitlines()) for c in CATEGORIES)
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, anomret.report, anomret.reporting.page, anomret.reporting.sweep_callback; "
            "print(sorted(m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.stdout.strip() == "[]", imported.stderr


def _open(context: Any, page_path: Path, screenshot: Path) -> tuple[Any, dict[str, list[str]]]:
    """Load a page; returns it with its console messages, page errors, failed and non-file requests."""
    seen: dict[str, list[str]] = {"console": [], "errors": [], "failed": [], "elsewhere": []}
    page = context.new_page()
    page.on("console", lambda message: seen["console"].append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on("requestfailed", lambda request: seen["failed"].append(f"{request.url}: {request.failure}"))
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(("file://", "data:")) else seen["elsewhere"].append(request.url)
        ),
    )
    page.goto(page_path.as_uri(), wait_until="load")
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot of {page_path}: {screenshot}")
    return page, seen


def _assert_clean_with_every_image(page: Any, seen: dict[str, list[str]]) -> int:
    assert seen == {"console": [], "errors": [], "failed": [], "elsewhere": []}
    widths = page.eval_on_selector_all(
        "img", "images => images.map(i => [i.getAttribute('src'), i.naturalWidth])"
    )
    assert widths and all(width > 0 for _, width in widths), widths
    return len(widths)


def test_run_page_in_a_browser(sweep, browser_context, tmp_path):
    sweep_dir, _ = sweep
    job = sweep_dir / "1"
    run_cli(["-m", "anomret.report", str(job)], tmp_path)  # a run's page, with its figures drawn
    page, seen = _open(browser_context, job / "report.html", tmp_path / "run_page.png")
    images = _assert_clean_with_every_image(page, seen)
    results = json.loads((job / "results.json").read_text())
    rows = page.eval_on_selector_all("table.metrics tbody tr", "rows => rows.map(r => r.dataset.category)")
    assert rows == list(results["categories"]) == CATEGORIES
    overlays = (job / "overlays" / "index.csv").read_text().strip().splitlines()[1:]
    assert images == len(CATEGORIES) + len(overlays)  # a figure per category, every overlay
    text = page.inner_text("body")
    assert "K = 6 (retrieval.k=8 capped at the memory's 6 images)" in text
    assert "F1-max threshold on these test scores" in text
    assert (tmp_path / "run_page.png").stat().st_size > 10_000
    page.close()


def test_sweep_page_in_a_browser(sweep, browser_context, tmp_path):
    sweep_dir, _ = sweep
    page, seen = _open(browser_context, sweep_dir / "report.html", tmp_path / "sweep_page.png")
    _assert_clean_with_every_image(page, seen)
    assert page.eval_on_selector_all("table.jobs tbody tr", "rows => rows.length") == 2
    assert "8 → 6" in page.inner_text("table.jobs")  # the capped K of job 1
    # The config of each job is one click away.
    page.click("table.jobs tbody tr:nth-child(2) a:text('config')")
    assert page.evaluate("location.hash") == "#config-1"
    assert "retrieval.k=8" in page.inner_text("section#config-1 h3")
    page.close()


def test_run_page_is_logged_to_wandb_as_a_report_artifact(compose_config, tmp_path):
    cfg = compose_config(["+experiment=demo_rad_fewshot", "logger=wandb", "logger.wandb.offline=true"])
    run(cfg, fit=True)
    page = tmp_path / "run" / "report.html"
    log_file = next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    from wandb.proto import wandb_internal_pb2

    artifacts = []
    for raw in finished_records(log_file):  # the file can lag behind wandb.finish() on a busy machine
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "report":
            artifacts.append(record.artifact)
    assert len(artifacts) == 1 and artifacts[0].name.startswith("report-")
    files = {entry.path: entry.digest for entry in artifacts[0].manifest.contents}
    assert files["report.html"] == base64.b64encode(hashlib.md5(page.read_bytes()).digest()).decode()
    assert {Path(p).parent.name for p in files if p.endswith(".png")} >= {"report_files", *CATEGORIES}
    assert "image_scores.csv" in files and "overlays/index.csv" in files
