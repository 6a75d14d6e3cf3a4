"""The report page: a self-contained ``report.html`` for a run directory and for a sweep directory.

Self-contained means nothing is fetched from a network or a server: CSS is inline, there is no script,
and every image is either a file beside the page, referenced by a relative path (a run page's figures in
``report_files/``, the run's ``overlays/``), or inside it as a data URI (a sweep page's plots, so a sweep
directory holds nothing but its jobs and report files). A directory can be copied, archived or opened
from a file browser as it is.

Run page (:func:`write_run_page`), in this order:

- a header with the run's method, dataset, retrieval K (saying when it was capped), the AUPRO variant and
  the image threshold the page uses;
- the per-category table (the best value of each metric column marked) with the images, the threshold
  and the false positives and negatives at it, then the mean;
- per category, the image ROC and precision-recall curves and the score histograms of normal vs anomalous
  images with the threshold (read from ``image_scores.csv``);
- the overlay gallery (``overlays/index.csv``), per category false positives first, then false
  negatives, then the rest, each group sorted by score;
- the run's ``config.yaml``, command-line overrides and ``artifacts.json``.

The image threshold is the one ``results.json`` records under ``settings.thresholds.image`` (one number,
or one per category) when there is one; otherwise each category's F1-max threshold on its own test
scores, labelled as such.

Sweep page (:func:`write_sweep_page`): one row per job (best values marked, each job's page and config a
click away), the jobs that have no results, the plots of each metric that changes against each swept
key, and every job's config.

Figures are named after a digest of what they show, so writing a page again redraws only what changed.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from anomret.files import write_text_atomic
from anomret.metrics.results import (
    METRIC_LABELS,
    EvaluationResult,
    ImageScore,
    read_image_scores,
    retrieval_note,
)
from anomret.reporting.curves import F1_MAX_LABEL, SAVED_LABEL, Threshold, image_thresholds, outcome

if TYPE_CHECKING:
    from anomret.reporting.sweep import SweepReport

__all__ = [
    "FILES_DIR",
    "PAGE_NAME",
    "GalleryItem",
    "best_cells",
    "log_page_artifact",
    "read_overlay_index",
    "write_run_page",
    "write_sweep_page",
]

PAGE_NAME = "report.html"
FILES_DIR = "report_files"
OVERLAY_INDEX = Path("overlays") / "index.csv"
IMAGE_SCORES = "image_scores.csv"
# Part of every figure's digest: a change to how figures are drawn redraws them.
_FIGURE_STYLE = "category-figure-2"
# Gallery order: the mistakes first.
_OUTCOME_ORDER = {"FP": 0, "FN": 1, "TP": 2, "TN": 3}
_OUTCOME_NAMES = {
    "FP": "false positive",
    "FN": "false negative",
    "TP": "true positive",
    "TN": "true negative",
}

_CSS = """
:root { --ink: #1b1f24; --muted: #57606a; --line: #d0d7de; --tint: #f6f8fa; --best: #dafbe1;
  --fp: #cf222e; --fn: #9a6700; --tp: #1a7f37; --tn: #57606a; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); }
header, main { max-width: 1280px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 16px; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.6em; margin: 0.2em 0; }
h2 { font-size: 1.3em; margin: 1.6em 0 0.4em; padding-top: 0.4em; border-top: 1px solid var(--line); }
main > section:first-child > h2 { border-top: none; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.where { color: var(--muted); margin: 0; word-break: break-all; }
ul.facts { list-style: none; padding: 0; margin: 8px 0; display: flex; flex-wrap: wrap; gap: 6px 18px; }
ul.facts li { white-space: nowrap; } ul.facts b { font-weight: 600; }
nav { margin: 8px 0 12px; display: flex; gap: 16px; flex-wrap: wrap; }
nav a { font-weight: 600; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; color: var(--muted); padding-top: 6px; font-size: 0.92em; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { border-bottom: 2px solid var(--ink); text-align: right; }
thead th.text, tbody th, tfoot th { text-align: left; }
td { text-align: right; } td.text { text-align: left; }
tbody tr:nth-child(even) { background: var(--tint); }
tfoot tr { font-weight: 600; border-top: 2px solid var(--ink); }
td.best { background: var(--best); font-weight: 700; }
.note { color: var(--muted); font-size: 0.92em; }
figure { margin: 0; }
.category-figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fff; }
.tile img { width: 100%; height: auto; display: block; }
.tile figcaption { font-size: 0.88em; margin-top: 4px; overflow-wrap: anywhere; }
.tile.FP { border: 2px solid var(--fp); } .tile.FN { border: 2px solid var(--fn); }
.badge { display: inline-block; padding: 0 6px; border-radius: 10px; color: #fff; font-weight: 700;
  font-size: 0.85em; margin-right: 6px; }
.badge.FP { background: var(--fp); } .badge.FN { background: var(--fn); }
.badge.TP { background: var(--tp); } .badge.TN { background: var(--tn); }
.sweep-plot img { max-width: 100%; height: auto; border: 1px solid var(--line); }
pre.config { background: var(--tint); border: 1px solid var(--line); padding: 10px; max-height: 28em;
  overflow: auto; margin: 4px 0 12px; }
section.job-config:target h3 { background: #fff8c5; }
details summary { cursor: pointer; font-weight: 600; }
.missing { color: var(--fp); }
"""

e = html.escape


def _is_nan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _percent(value: float | None) -> str:
    return "–" if value is None or _is_nan(value) else f"{100 * value:.1f}"


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _href(target: Path, base: Path) -> str:
    """A relative link from a page in ``base`` to ``target``, with the characters URLs need escaped."""
    from urllib.parse import quote

    return quote(Path(os.path.relpath(target, base)).as_posix())


def best_cells(columns: Sequence[Sequence[float | None]], decimals: int = 1) -> list[set[int]]:
    """For each column of fractions, the rows holding its best (highest) value as shown in percent.

    Values are compared as the table prints them (``decimals`` places of percent), so cells that read the
    same are marked together. Undefined values are never best; a column with fewer than two defined
    values has no best.
    """
    marked: list[set[int]] = []
    for values in columns:
        shown = {
            i: round(100 * v, decimals) for i, v in enumerate(values) if v is not None and not _is_nan(v)
        }
        if len(shown) < 2:
            marked.append(set())
            continue
        top = max(shown.values())
        marked.append({i for i, v in shown.items() if v == top})
    return marked


# ------------------------------------------------------------------------------------- page frame
def _page(title: str, header: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header>\n{header}\n</header>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _facts(items: Iterable[tuple[str, str]]) -> str:
    return "<ul class='facts'>" + "".join(f"<li><b>{e(k)}</b> {e(v)}</li>" for k, v in items) + "</ul>"


def _nav(links: Iterable[tuple[str, str]]) -> str:
    return "<nav>" + "".join(f"<a href='#{e(a)}'>{e(text)}</a>" for a, text in links) + "</nav>"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _overrides(run_dir: Path) -> list[str]:
    text = _read_text(run_dir / ".hydra" / "overrides.yaml")
    try:
        lines = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return []
    return [str(line) for line in lines] if isinstance(lines, list) else []


# ------------------------------------------------------------------------------------ run: gallery
@dataclass(frozen=True)
class GalleryItem:
    """One overlay the run wrote (a row of ``overlays/index.csv``)."""

    category: str
    image: str
    label: int
    score: float
    file: str  # relative to the run directory


def read_overlay_index(run_dir: Path) -> list[GalleryItem]:
    """The overlays listed in ``overlays/index.csv``; none when the run has no index."""
    path = Path(run_dir) / OVERLAY_INDEX
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return [
            GalleryItem(row["category"], row["image"], int(row["label"]), float(row["score"]), row["file"])
            for row in csv.DictReader(handle)
        ]


def gallery_order(items: Iterable[GalleryItem], threshold: Threshold) -> list[tuple[str, GalleryItem]]:
    """``(outcome, item)`` with false positives first (highest score first), then false negatives
    (lowest score first), then true positives and true negatives (highest score first)."""
    judged = [(outcome(item.score, item.label, threshold.value), item) for item in items]

    def key(pair: tuple[str, GalleryItem]) -> tuple[int, float]:
        result, item = pair
        return _OUTCOME_ORDER[result], item.score if result == "FN" else -item.score

    return sorted(judged, key=key)


# -------------------------------------------------------------------------------------- run: page
@dataclass
class _RunData:
    run_dir: Path
    result: EvaluationResult
    images: list[ImageScore] | None
    gallery: list[GalleryItem]
    config: str | None
    overrides: list[str]
    artifacts: str | None
    by_category: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir: Path) -> _RunData:
        result = EvaluationResult.read_json(run_dir / "results.json")
        scores_file = run_dir / IMAGE_SCORES
        images = read_image_scores(scores_file) if scores_file.is_file() else None
        data = cls(
            run_dir,
            result,
            images,
            read_overlay_index(run_dir),
            _read_text(run_dir / "config.yaml"),
            _overrides(run_dir),
            _read_text(run_dir / "artifacts.json"),
        )
        for image in images or []:
            scores, labels = data.by_category.setdefault(image.category, ([], []))
            scores.append(image.score)
            labels.append(image.label)
        return data

    @property
    def title(self) -> str:
        run = self.result.settings.get("run") or {}
        task = None
        if self.config:
            try:
                task = (yaml.safe_load(self.config) or {}).get("task_name")
            except (yaml.YAMLError, AttributeError):
                task = None
        parts = [task, run.get("dataset"), run.get("method")]
        return " · ".join(str(p) for p in parts if p) or self.run_dir.name


def _figure_name(
    category: str, scores: list[float], labels: list[int], threshold: Threshold, extra: Any
) -> str:
    digest = hashlib.sha1(
        json.dumps([_FIGURE_STYLE, scores, labels, threshold.value, threshold.source, extra]).encode()
    ).hexdigest()[:12]
    return f"{_anchor(category)}-{digest}.png"


def _category_figures(
    data: _RunData, thresholds: dict[str, Threshold], files: Path, draw: bool = True
) -> dict[str, Path]:
    """Category -> its figure; ``draw=False``: only the figures already drawn for these scores."""
    figures = {}
    for category, (scores, labels) in data.by_category.items():
        values = data.result.per_category.get(category, {})
        auroc, ap = values.get("image_auroc"), values.get("image_ap")
        name = _figure_name(category, scores, labels, thresholds[category], [auroc, ap])
        path = files / name
        if not path.is_file() and draw:
            from anomret.reporting.figures import category_figure

            category_figure(path, scores, labels, thresholds[category], auroc=auroc, ap=ap)
        if path.is_file():
            figures[category] = path
    return figures


def _remove_unused(files: Path, used: Iterable[Path]) -> None:
    keep = {Path(p).name for p in used}
    if files.is_dir():
        for path in files.glob("*.png"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _threshold_fact(thresholds: dict[str, Threshold]) -> str:
    if not thresholds:
        return "none (no image_scores.csv in this run directory)"
    sources = {t.source for t in thresholds.values()}
    if sources == {SAVED_LABEL}:
        values = {t.value for t in thresholds.values()}
        where = "results.json settings.thresholds.image"
        return (
            f"{SAVED_LABEL} {next(iter(values)):.4g} ({where})"
            if len(values) == 1
            else f"{SAVED_LABEL}s ({where})"
        )
    if sources == {F1_MAX_LABEL}:
        return f"{F1_MAX_LABEL}, per category (no saved threshold in results.json)"
    return f"{SAVED_LABEL} where results.json has one, else the {F1_MAX_LABEL}"


def _metrics_table(data: _RunData, thresholds: dict[str, Threshold]) -> str:
    result = data.result
    categories = list(result.per_category)
    metrics = list(result.metrics)
    best = best_cells([[result.per_category[c].get(m) for c in categories] for m in metrics])
    outcomes: dict[str, dict[str, int]] = {}
    for image in data.images or []:
        threshold = thresholds.get(image.category)
        if threshold is not None:
            counts = outcomes.setdefault(image.category, {"FP": 0, "FN": 0})
            verdict = outcome(image.score, image.label, threshold.value)
            if verdict in counts:
                counts[verdict] += 1
    judged = bool(outcomes)
    head = "<tr><th class='text' scope='col'>category</th>" + "".join(
        f"<th scope='col' title='{e(m)}'>{e(METRIC_LABELS.get(m, m))}</th>" for m in metrics
    )
    head += "<th scope='col'>images</th><th scope='col'>anomalous</th>"
    if judged:
        head += "<th scope='col'>threshold</th><th scope='col'>FP</th><th scope='col'>FN</th>"
    head += "</tr>"
    rows = []
    for row, category in enumerate(categories):
        values = result.per_category[category]
        counts = result.counts.get(category, {})
        link = f"#cat-{_anchor(category)}" if category in data.by_category else None
        name = f"<a href='{link}'>{e(category)}</a>" if link else e(category)
        cells = [f"<th scope='row'>{name}</th>"]
        for column, metric in enumerate(metrics):
            marked = row in best[column]
            cells.append(f"<td{' class=best' if marked else ''}>{_percent(values.get(metric))}</td>")
        cells.append(f"<td>{counts.get('n_images', '')}</td><td>{counts.get('n_anomalous', '')}</td>")
        if judged:
            threshold = thresholds.get(category)
            shown = "–" if threshold is None or math.isnan(threshold.value) else f"{threshold.value:.4g}"
            got = outcomes.get(category, {})
            cells.append(f"<td>{shown}</td><td>{got.get('FP', '–')}</td><td>{got.get('FN', '–')}</td>")
        rows.append(f"<tr data-category='{e(category)}'>" + "".join(cells) + "</tr>")
    mean = result.mean
    foot = "<tr><th scope='row'>mean</th>" + "".join(f"<td>{_percent(mean.get(m))}</td>" for m in metrics)
    foot += "<td></td><td></td>" + ("<td></td><td></td><td></td>" if judged else "") + "</tr>"
    notes = [n for n in (result.aupro_note(), retrieval_note(result.settings)) if n]
    notes.append("Percent, one decimal. Highlighted: the best value of the column (equal values all marked).")
    if judged:
        notes.append(
            "FP and FN: false positives and false negatives at the threshold, among all test images."
        )
    caption = "<caption>" + "<br>".join(e(n) for n in notes) + "</caption>"
    return (
        f"<div class='scroll'><table class='metrics'>{caption}<thead>{head}</thead>"
        f"<tbody>{''.join(rows)}</tbody><tfoot>{foot}</tfoot></table></div>"
    )


def _curves_section(
    data: _RunData, figures: dict[str, Path], thresholds: dict[str, Threshold], out: Path
) -> str:
    if data.images is None:
        return (
            "<p class='note'>No per-image scores: this run directory has no image_scores.csv "
            "(runs write it at the end of their test pass).</p>"
        )
    parts = [
        "<p class='note'>Image level, per category: ROC and precision-recall curves with the operating point "
        "at the threshold, and the image scores of normal and anomalous images with the threshold.</p>"
    ]
    undrawn = [category for category in data.by_category if category not in figures]
    if undrawn:
        parts.append(
            f"<p class='note undrawn'>Figures not drawn for {e(', '.join(undrawn))}: a run draws them unless it "
            "is a job of a sweep (whose page compares the jobs) or <code>report_figures=never</code>. "
            f"To draw them: <code>python -m anomret.report {e(str(data.run_dir))}</code></p>"
        )
    for category, path in figures.items():
        threshold = thresholds[category]
        alt = f"{category}: image ROC curve, precision-recall curve and score histograms; {threshold.source}"
        parts.append(
            f"<figure class='category-figure' id='cat-{_anchor(category)}'><h3>{e(category)}</h3>"
            f"<img src='{_href(path, out)}' alt='{e(alt)}'></figure>"
        )
    return "\n".join(parts)


def _gallery_section(data: _RunData, thresholds: dict[str, Threshold], out: Path) -> str:
    if not data.gallery:
        return "<p class='note'>No overlays: this run directory has no overlays/index.csv.</p>"
    parts = [
        "<p class='note'>The run keeps, per category, the highest-scoring normal images (the likeliest false "
        "positives), the lowest-scoring anomalous ones (the likeliest false negatives) and the highest-scoring "
        "anomalous ones. Each overlay: the image with the ground-truth outline, the anomaly map over it and "
        "its colour scale. Mistakes at the threshold come first.</p>"
    ]
    by_category: dict[str, list[GalleryItem]] = {}
    for item in data.gallery:
        by_category.setdefault(item.category, []).append(item)
    for category, items in by_category.items():
        threshold = thresholds.get(category, Threshold(math.nan, F1_MAX_LABEL))
        tiles = []
        for verdict, item in gallery_order(items, threshold):
            shown = verdict if not math.isnan(threshold.value) else ""
            badge = (
                f"<span class='badge {shown}' title='{_OUTCOME_NAMES[shown]}'>{shown}</span>" if shown else ""
            )
            name = f"{Path(item.image).parent.name}/{Path(item.image).name}"
            tiles.append(
                f"<figure class='tile {shown}'><img src='{_href(data.run_dir / item.file, out)}' "
                f"alt='{e(category)} {e(name)} overlay'><figcaption>{badge}score <b>{item.score:.4f}</b> · "
                f"{'anomalous' if item.label else 'normal'} · <span title='{e(item.image)}'>{e(name)}</span>"
                "</figcaption></figure>"
            )
        parts.append(
            f"<h3 id='gallery-{_anchor(category)}'>{e(category)}</h3><div class='tiles'>{''.join(tiles)}</div>"
        )
    return "\n".join(parts)


def _config_section(data: _RunData) -> str:
    parts = []
    if data.overrides:
        parts.append(
            "<h3>Command-line overrides</h3><pre class='config'>" + e("\n".join(data.overrides)) + "</pre>"
        )
    if data.config is not None:
        parts.append("<h3>config.yaml</h3><pre class='config'>" + e(data.config) + "</pre>")
    else:
        parts.append("<p class='note'>No config.yaml in this run directory.</p>")
    if data.artifacts is not None:
        parts.append("<h3>artifacts.json</h3><pre class='config'>" + e(data.artifacts) + "</pre>")
    return "\n".join(parts)


def write_run_page(run_dir: str | Path, out_dir: str | Path | None = None, figures: bool = True) -> Path:
    """Write ``report.html`` (and its figures in ``report_files/``) for a finished run; returns its path.

    Args:
        run_dir: a run directory holding ``results.json`` (and, for curves and the gallery,
            ``image_scores.csv`` and ``overlays/index.csv``).
        out_dir: where the page goes (default: the run directory); its links reach back into the run.
        figures: draw the per-category figures (matplotlib, ~0.3 s each); ``False`` keeps those already
            drawn for these scores and says how to draw the others (the jobs of a sweep).

    Raises:
        OSError, ValueError: ``results.json`` is missing or unreadable, or ``image_scores.csv`` is malformed.
    """
    run_dir = Path(run_dir).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else run_dir
    data = _RunData.read(run_dir)
    settings = data.result.settings
    thresholds = image_thresholds(settings, data.by_category)
    files = out / FILES_DIR
    drawn = _category_figures(data, thresholds, files, draw=figures)
    _remove_unused(files, drawn.values())

    run = settings.get("run") or {}
    facts = [("method", str(run.get("method", "?"))), ("dataset", str(run.get("dataset", "?")))]
    note = retrieval_note(settings)
    if note:
        facts.append(("retrieval", note))
    facts.append(("image threshold", _threshold_fact(thresholds)))
    counts = data.result.counts.values()
    images, anomalous = (sum(c.get(key, 0) for c in counts) for key in ("n_images", "n_anomalous"))
    facts.append(("test images", f"{images} ({anomalous} anomalous)"))
    header = (
        f"<h1>{e(data.title)}</h1><p class='where'>run directory <code>{e(str(run_dir))}</code></p>"
        + _facts(facts)
        + _nav(
            [
                ("metrics", "Metrics"),
                ("curves", "Curves and scores"),
                ("gallery", "Overlays"),
                ("config", "Config"),
            ]
        )
    )
    sections = [
        ("metrics", "Metrics per category", _metrics_table(data, thresholds)),
        ("curves", "Curves and image scores", _curves_section(data, drawn, thresholds, out)),
        ("gallery", "Overlays", _gallery_section(data, thresholds, out)),
        ("config", "Config", _config_section(data)),
    ]
    body = "\n".join(
        f"<section id='{id_}'><h2>{title}</h2>{content}</section>" for id_, title, content in sections
    )
    return write_text_atomic(out / PAGE_NAME, _page(f"anomret report: {data.title}", header, body))


# ------------------------------------------------------------------------------------ sweep: page
def write_sweep_page(report: SweepReport, out_dir: str | Path, plots: dict[str, bytes] | None = None) -> Path:
    """Write the sweep's ``report.html`` into ``out_dir``; returns its path.

    Args:
        report: the collected jobs (:func:`anomret.report.collect`).
        out_dir: where the page goes (``anomret.report`` writes it into the sweep directory).
        plots: swept key -> its plot as PNG (:meth:`SweepReport.draw_plots`), held in the page as a data
            URI; ``None``: the page says the plots were left out.
    """
    out = Path(out_dir).resolve()
    methods = sorted({job.method for job in report.jobs})
    datasets = sorted({job.dataset for job in report.jobs})
    jobs = f"{len(report.jobs)} finished"
    if report.missing:
        jobs += f", {len(report.missing)} without results"
    facts = [("jobs", jobs), ("method", ", ".join(methods)), ("dataset", ", ".join(datasets))]
    facts.append(("swept", ", ".join(report.swept) or "nothing (the jobs share every override)"))
    title = f"Sweep · {out.name}"
    header = (
        f"<h1>{e(title)}</h1><p class='where'>sweep directory <code>{e(str(out))}</code></p>"
        + _facts(facts)
        + _nav([("results", "Results"), ("plots", "Plots"), ("configs", "Job configs")])
    )
    sections = [("results", "Results per job", _jobs_table(report, out, len(methods) > 1, len(datasets) > 1))]
    if report.missing:
        sections.append(("missing", f"Jobs without results ({len(report.missing)})", _missing_list(report)))
    sections.append(("plots", "Metrics against each swept value", _plots_section(report, plots)))
    sections.append(("configs", "Job configs", _job_configs(report)))
    body = "\n".join(
        f"<section id='{id_}'><h2>{title}</h2>{content}</section>" for id_, title, content in sections
    )
    return write_text_atomic(out / PAGE_NAME, _page(f"anomret report: {title}", header, body))


def _jobs_table(report: SweepReport, out: Path, show_method: bool, show_dataset: bool) -> str:
    metrics = list(report.metrics)
    means = [report.job_mean(job) for job in report.jobs]
    best = best_cells([[mean[m] for mean in means] for m in metrics])
    k_used = [_k_used(job.result.settings if job.result else {}) for job in report.jobs]
    show_k = any(used is not None and "→" in used for used in k_used)  # only when some K was capped
    text_columns = [
        *report.swept,
        *(["method"] if show_method else []),
        *(["dataset"] if show_dataset else []),
    ]
    head = "<th class='text' scope='col'>job</th>"
    head += "".join(f"<th class='text' scope='col'>{e(key)}</th>" for key in text_columns)
    head += "".join(f"<th scope='col' title='{e(m)}'>{e(METRIC_LABELS.get(m, m))}</th>" for m in metrics)
    head += "<th scope='col'>K used</th>" if show_k else ""
    head += "<th class='text' scope='col'>details</th>"
    rows = []
    for row, job in enumerate(report.jobs):
        page = job.path / PAGE_NAME
        link = _href(page, out) if page.is_file() else None
        values = {**job.overrides, "method": job.method, "dataset": job.dataset}
        name = f"<a href='{link}'>{e(job.name)}</a>" if link else e(job.name)
        cells = [f"<th scope='row'>{name}</th>"]
        cells += [f"<td class='text'>{e(values.get(key, ''))}</td>" for key in text_columns]
        for column, metric in enumerate(metrics):
            marked = " class=best" if row in best[column] else ""
            cells.append(f"<td{marked}>{_percent(means[row][metric])}</td>")
        if show_k:
            cells.append(f"<td>{e(k_used[row] or '')}</td>")
        links = ([f"<a href='{link}'>run page</a>"] if link else []) + [
            f"<a href='#config-{_anchor(job.name)}'>config</a>"
        ]
        cells.append(f"<td class='text'>{' · '.join(links)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    notes = ["Mean over categories, percent with one decimal. Highlighted: the best value of the column."]
    if show_k:
        notes.append("K used: retrieval.k → the K the job ran with, capped at its few-shot memory's size.")
    return (
        f"<div class='scroll'><table class='jobs'><caption>{'<br>'.join(e(n) for n in notes)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _missing_list(report: SweepReport) -> str:
    items = []
    for job in report.missing:
        overrides = " ".join(f"{k}={v}" for k, v in job.overrides.items()) or "no overrides"
        items.append(f"<li><b>{e(job.name)}</b>: <code>{e(overrides)}</code></li>")
    return (
        "<p class='note'>Failed, killed or still running: these jobs have no results.json.</p>"
        f"<ul class='missing'>{''.join(items)}</ul>"
    )


def _job_configs(report: SweepReport) -> str:
    parts = []
    for job in [*report.jobs, *report.missing]:
        config = _read_text(job.path / "config.yaml")
        overrides = " ".join(f"{k}={v}" for k, v in job.overrides.items()) or "no overrides"
        shown = (
            f"<pre class='config'>{e(config)}</pre>"
            if config is not None
            else "<p class='note'>no config.yaml</p>"
        )
        parts.append(
            f"<section class='job-config' id='config-{_anchor(job.name)}'>"
            f"<h3>job {e(job.name)}: <code>{e(overrides)}</code></h3>{shown}</section>"
        )
    return "".join(parts)


def _k_used(settings: dict[str, Any]) -> str | None:
    retrieval = settings.get("retrieval")
    if not isinstance(retrieval, dict) or retrieval.get("k_used") is None:
        return None
    used, asked = retrieval["k_used"], retrieval.get("k")
    return f"{asked} → {used}" if asked is not None and asked != used else str(used)


def _plots_section(report: SweepReport, plots: dict[str, bytes] | None) -> str:
    if not report.swept:
        return "<p class='note'>Nothing was swept: there is no value to plot against.</p>"
    if plots is None:
        return "<p class='note'>Plots left out (python -m anomret.report DIR --no-plots).</p>"
    parts = [
        "<p class='note'>Mean over categories against each swept key, one panel per metric that changes with "
        "the key; one line per combination of the other swept keys.</p>"
    ]
    for key in report.swept:
        changing = report.changing_metrics(key)
        unchanged = [METRIC_LABELS.get(m, m) for m in report.metrics if m not in changing]
        parts.append(f"<h3>{e(key)}</h3>")
        if key in plots:
            labels = ", ".join(METRIC_LABELS.get(m, m) for m in changing)
            data = base64.b64encode(plots[key]).decode("ascii")
            parts.append(
                f"<figure class='sweep-plot'><img src='data:image/png;base64,{data}' "
                f"alt='{e(labels)} against {e(key)}'></figure>"
            )
        if unchanged:
            parts.append(
                f"<p class='note'>Not drawn, no change with {e(key)}: {e(', '.join(unchanged))}.</p>"
            )
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------- W&B
def log_page_artifact(run: Any, page: str | Path) -> Any:
    """Log a run page to W&B as an artifact of type ``report``: the page, its figures and the overlays it
    shows, laid out as in the run directory so its links work once downloaded. Returns the artifact."""
    import wandb

    page = Path(page)
    artifact = wandb.Artifact(
        name=f"report-{run.id}", type="report", description="anomret run report page (open report.html)"
    )
    artifact.add_file(str(page), name=PAGE_NAME)
    for folder in (FILES_DIR, "overlays"):
        if (page.parent / folder).is_dir():
            artifact.add_dir(str(page.parent / folder), name=folder)
    if (page.parent / IMAGE_SCORES).is_file():
        artifact.add_file(str(page.parent / IMAGE_SCORES), name=IMAGE_SCORES)
    run.log_artifact(artifact)
    return artifact
