"""The report page from run and sweep directories as runs leave them (no browser: the HTML itself)."""

from __future__ import annotations

import csv
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from anomret.metrics.evaluator import METRIC_KEYS
from anomret.metrics.results import EvaluationResult, ImageScore
from anomret.report import main
from anomret.reporting.curves import F1_MAX_LABEL
from anomret.reporting.page import FILES_DIR, write_run_page
from anomret.reporting.sweep_callback import SweepReportCallback

_VOID = {"meta", "img", "br", "link", "input", "hr"}


class _Parsed(HTMLParser):
    """Every element with its attributes and its ancestors' ``tag.class#id``; the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values, tuple(self.stack)))
        if tag not in _VOID:
            label = tag + "".join("." + c for c in values.get("class", "").split())
            self.stack.append(label + (f"#{values['id']}" if values.get("id") else ""))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop().split(".")[0].split("#")[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, inside: str = "") -> list[dict[str, str]]:
        return [a for t, a, up in self.elements if t == tag and any(inside in u for u in up)]

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def _png(path: Path, size: tuple[int, int] = (20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def _run_dir(root: Path, settings: dict | None = None, *, scores: bool = True, overlays: bool = True) -> Path:
    """A run directory as anomret.train leaves it: categories a (4 images) and b (4 images)."""
    root.mkdir(parents=True, exist_ok=True)
    values = {
        "a": {m: 0.6 + 0.01 * i for i, m in enumerate(METRIC_KEYS)},
        "b": {m: 0.7 - 0.01 * i for i, m in enumerate(METRIC_KEYS)},
    }
    values["b"]["image_auroc"] = values["a"]["image_auroc"]  # a tie: both marked
    images = [
        ImageScore("a", "/d/a/good/0.png", 0, 0.1),
        ImageScore("a", "/d/a/crack/0.png", 1, 0.9),
        ImageScore("a", "/d/a/good/1.png", 0, 0.4),
        ImageScore("a", "/d/a/crack/1.png", 1, 0.35),
        ImageScore("b", "/d/b/good/0.png", 0, 0.2),
        ImageScore("b", "/d/b/good/1.png", 0, 0.75),
        ImageScore("b", "/d/b/hole/0.png", 1, 0.7),
        ImageScore("b", "/d/b/hole/1.png", 1, 0.8),
    ]
    counts = {c: {"n_images": 4, "n_anomalous": 2} for c in values}
    settings = {"run": {"method": "rad", "dataset": "synthetic_a"}, **(settings or {})}
    result = EvaluationResult(values, counts, METRIC_KEYS, settings, images)
    result.write_json(root / "results.json")
    if scores:
        result.write_image_scores(root / "image_scores.csv")
    if overlays:
        rows = []
        for number, image in enumerate(images):
            file = f"overlays/{image.category}/{number:02d}_{Path(image.image).parent.name}.png"
            _png(root / file)
            rows.append([image.category, image.image, image.label, image.score, file])
        with (root / "overlays" / "index.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["category", "image", "label", "score", "file"], *rows])
    (root / "config.yaml").write_text("task_name: demo_rad\nretrieval:\n  k: 8\n")
    (root / ".hydra").mkdir(exist_ok=True)
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+experiment=demo_rad", "retrieval.k=8"]))
    (root / "artifacts.json").write_text('{"bank": "/banks/x.safetensors"}')
    return root


def _read(page: Path) -> _Parsed:
    return _Parsed(page.read_text(encoding="utf-8"))


def _assert_self_contained(page: Path) -> None:
    parsed = _read(page)
    assert not parsed.find("script") and not parsed.find("link")  # inline CSS, no script
    for attrs in parsed.find("img"):
        source = attrs["src"]
        if source.startswith("data:"):
            assert source.startswith("data:image/png;base64,") and len(source) > 1000
        else:
            assert "://" not in source and (page.parent / source).is_file(), source
    for attrs in parsed.find("a"):
        href = attrs["href"]
        assert "://" not in href
        if href.startswith("#"):
            assert any(a.get("id") == href[1:] for _, a, _ in parsed.elements), href
        else:
            assert (page.parent / href).is_file(), href


def test_run_page_sections_table_and_images(tmp_path):
    run = _run_dir(tmp_path / "run")
    page = write_run_page(run)
    assert page == run / "report.html"
    _assert_self_contained(page)
    parsed = _read(page)
    sections = [a["id"] for a in parsed.find("section")]
    assert sections == ["metrics", "curves", "gallery", "config"]
    rows = parsed.find("tr", inside="table.metrics")
    assert [r.get("data-category") for r in rows if r.get("data-category")] == ["a", "b"]
    assert len(parsed.find("tr", inside="tbody")) == 2  # a row per category; the mean is in tfoot
    # a: 0.60 + 0.01·i, b: 0.70 − 0.01·i, with I-AUROC set equal: ties at I-AUROC and at i = 5 (P-F1max).
    html = page.read_text()
    for category, best in (("a", [0, 5, 6]), ("b", [0, 1, 2, 3, 4, 5])):
        row = re.search(rf"<tr data-category='{category}'>.*?</tr>", html).group(0)
        cells = re.findall(r"<td( class=best)?>", row)[: len(METRIC_KEYS)]
        assert [i for i, marked in enumerate(cells) if marked] == best
    figures = sorted(p.name for p in (run / FILES_DIR).glob("*.png"))
    assert len(figures) == 2 and figures[0].startswith("a-") and figures[1].startswith("b-")
    assert len(parsed.find("img", inside="section#gallery")) == 8
    text = parsed.plain
    assert "demo_rad · synthetic_a · rad" in text
    assert f"{F1_MAX_LABEL}, per category (no saved threshold in results.json)" in text
    assert "+experiment=demo_rad" in text and "/banks/x.safetensors" in text


def test_gallery_puts_false_positives_then_false_negatives_first(tmp_path):
    page = write_run_page(_run_dir(tmp_path / "run"))
    html = page.read_text()
    gallery_b = html[html.index("id='gallery-b'") :]
    # b: F1-max threshold 0.7 -> good/1 (0.75) is a false positive; no false negative.
    verdicts = re.findall(r"class='tile (\w*)'", gallery_b)
    assert verdicts == ["FP", "TP", "TP", "TN"]
    gallery_a = html[html.index("id='gallery-a'") : html.index("id='gallery-b'")]
    # a: F1-max threshold 0.35 -> good/1 (0.4) a false positive.
    assert re.findall(r"class='tile (\w*)'", gallery_a) == ["FP", "TP", "TP", "TN"]


def test_a_saved_image_threshold_is_used_and_named(tmp_path):
    run = _run_dir(tmp_path / "run", {"thresholds": {"image": 0.5}})
    page = write_run_page(run)
    text = _read(page).plain
    assert "saved image threshold 0.5 (results.json settings.thresholds.image)" in text
    assert F1_MAX_LABEL not in text
    html = page.read_text()
    # At 0.5: a has one false negative (crack/1, 0.35), b one false positive (good/1, 0.75).
    row_a = re.search(r"<tr data-category='a'>.*?</tr>", html).group(0)
    assert re.findall(r"<td>([^<]*)</td>", row_a)[-3:] == ["0.5", "0", "1"]
    gallery_a = html[html.index("id='gallery-a'") : html.index("id='gallery-b'")]
    assert re.findall(r"class='tile (\w*)'", gallery_a)[0] == "FN"


def test_figures_are_redrawn_only_when_what_they_show_changes(tmp_path):
    run = _run_dir(tmp_path / "run")
    write_run_page(run)
    before = {p.name: p.stat().st_mtime_ns for p in (run / FILES_DIR).iterdir()}
    write_run_page(run)
    assert {p.name: p.stat().st_mtime_ns for p in (run / FILES_DIR).iterdir()} == before
    _run_dir(run, {"thresholds": {"image": {"a": 0.2}}})  # category a's threshold changes
    write_run_page(run)
    after = {p.name for p in (run / FILES_DIR).iterdir()}
    assert len(after) == 2 and next(n for n in after if n.startswith("b-")) in before
    assert next(n for n in after if n.startswith("a-")) not in before  # the old figure is gone


def test_a_page_without_figures_keeps_those_drawn_and_names_the_command_for_the_others(tmp_path):
    run = _run_dir(tmp_path / "run")
    parsed = _read(write_run_page(run, figures=False))
    assert not (run / FILES_DIR).exists() or not list((run / FILES_DIR).iterdir())
    assert not parsed.find("img", inside="section#curves")
    assert "Figures not drawn for a, b" in parsed.plain
    assert f"python -m anomret.report {run.resolve()}" in parsed.plain
    write_run_page(run)  # drawn (anomret.report on the run), then kept by a page written without drawing
    drawn = sorted(p.name for p in (run / FILES_DIR).iterdir())
    parsed = _read(write_run_page(run, figures=False))
    assert sorted(p.name for p in (run / FILES_DIR).iterdir()) == drawn
    assert len(parsed.find("img", inside="section#curves")) == 2 and "Figures not drawn" not in parsed.plain


def test_a_run_without_per_image_files_still_gets_its_table(tmp_path):
    run = _run_dir(tmp_path / "run", scores=False, overlays=False)
    page = write_run_page(run)
    _assert_self_contained(page)
    parsed = _read(page)
    assert not parsed.find("img") and len(parsed.find("tr", inside="tbody")) == 2
    assert "no image_scores.csv" in parsed.plain and "no overlays/index.csv" in parsed.plain


def test_run_page_names_a_k_capped_at_the_memory_size(tmp_path):
    settings = {"retrieval": {"k": 8, "k_used": 6, "rho": 1, "memory_images": 6}}
    text = _read(write_run_page(_run_dir(tmp_path / "run", settings))).plain
    assert "K = 6 (retrieval.k=8 capped at the memory's 6 images), ρ = 1" in text


def test_report_command_on_a_run_directory_writes_its_run_page(tmp_path, capsys):
    run = _run_dir(tmp_path / "run")
    assert main([str(run)]) == 0
    assert (run / "report.html").is_file() and "data-category='b'" in (run / "report.html").read_text()
    printed = capsys.readouterr().out
    assert f"report page: {run / 'report.html'}" in printed and "I-AUROC" in printed


def _sweep(root: Path) -> Path:
    """Jobs over retrieval.k (4, 8) and retrieval.rho (0, 1): K capped in the k=8 jobs, a job missing."""
    sweep = root / "sweep"
    for number, (k, rho) in enumerate([(4, 0), (4, 1), (8, 0), (8, 1)]):
        settings = {"retrieval": {"k": k, "k_used": min(k, 6), "rho": rho, "memory_images": 6}}
        # Tables only: the run pages' figures are tested above, and drawing them here would only cost time.
        job = _run_dir(sweep / str(number), settings, scores=False, overlays=False)
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(["+experiment=demo_rad", f"retrieval.k={k}", f"retrieval.rho={rho}"])
        )
        data = (job / "results.json").read_text()
        # Image metrics move with rho only; pixel metrics never move.
        data = data.replace('"image_auroc": 0.6,', f'"image_auroc": {0.6 + 0.1 * rho},')
        (job / "results.json").write_text(data)
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["retrieval.k=16"]))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_sweep_page_rows_plots_and_configs(tmp_path):
    sweep = _sweep(tmp_path)
    assert main([str(sweep)]) == 0
    page = sweep / "report.html"
    _assert_self_contained(page)
    parsed = _read(page)
    assert len(parsed.find("tr", inside="tbody")) == 4  # a row per finished job
    text = parsed.plain
    assert "Jobs without results (1)" in text and "retrieval.k=16" in text
    assert "8 → 6" in text  # the capped K
    plots = parsed.find("img", inside="section#plots")
    assert len(plots) == 1 and plots[0]["alt"] == "I-AUROC against retrieval.rho"
    assert sorted(p.name for p in (sweep / "plots").iterdir()) == ["metrics_vs_retrieval.rho.png"]
    assert "Not drawn, no change with retrieval.k: I-AUROC" in text  # flat against k
    assert "no change with retrieval.rho: I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO" in text
    configs = parsed.find("section", inside="section#configs")
    assert [c["id"] for c in configs] == ["config-0", "config-1", "config-2", "config-3", "config-4"]
    for number in range(4):  # each job's own page was written, and is linked; its figures left to the job
        assert (sweep / str(number) / "report.html").is_file()
        assert not (sweep / str(number) / FILES_DIR).exists()
        assert any(a["href"] == f"{number}/report.html" for a in parsed.find("a", inside="table.jobs"))


def test_sweep_callback_reports_and_ends_with_the_directory_and_the_command(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReportCallback().on_multirun_end(config)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"sweep finished: {sweep}; report: python -m anomret.report {sweep}"
    assert (sweep / "report.html").is_file() and (sweep / "report.csv").is_file()
    # The sweep directory holds its jobs and files only: the page holds its plots itself.
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]
    assert "data:image/png;base64," in (sweep / "report.html").read_text()


def test_sweep_callback_of_a_sweep_without_results_only_names_its_directory(tmp_path, capsys):
    sweep = tmp_path / "predict-sweep"
    (sweep / "0").mkdir(parents=True)
    SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert capsys.readouterr().out.strip().splitlines() == [f"sweep finished: {sweep}"]
    assert not (sweep / "report.html").exists()


@pytest.mark.parametrize("name", ["bottle", "metal nut/№1"])
def test_category_names_become_safe_anchors_and_file_names(tmp_path, name):
    run = _run_dir(tmp_path / "run", overlays=False)
    data = (run / "results.json").read_text().replace('"a"', f'"{name}"')
    (run / "results.json").write_text(data)
    text = (run / "image_scores.csv").read_text().replace("\na,", f'\n"{name}",')
    (run / "image_scores.csv").write_text(text)
    page = write_run_page(run)
    _assert_self_contained(page)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{12}\.png", p.name) for p in (run / FILES_DIR).iterdir())


def test_sweep_report_without_plots_says_so_on_its_page(tmp_path):
    sweep = _sweep(tmp_path)
    assert main([str(sweep), "--no-plots"]) == 0
    parsed = _read(sweep / "report.html")
    assert not parsed.find("img") and "Plots left out" in parsed.plain
    assert not (sweep / "plots").exists()
