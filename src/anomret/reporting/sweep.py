"""The sweep report behind ``python -m anomret.report``: one table (CSV, markdown, rich), plots, a page.

A DIR is a multirun directory (``<job number>/results.json`` beside ``multirun.yaml``), one run directory, or
any folder above them: every ``results.json`` below it is a job, and every ``.hydra/overrides.yaml`` without
one is a job that failed or has not finished (listed as missing, never dropped silently). The columns are
the overrides whose values differ across jobs, the method and dataset recorded in ``results.json``, and the
seven metrics as the mean over categories (per category with ``--per-category``). ``--paper`` lays a
cross-dataset sweep out as MRAD's Table 1.

It also writes ``report.html`` (:mod:`anomret.reporting.page`): the run page for one run directory, else
the sweep page, plus the run page of every job below the output directory. Nothing on this path imports
torch; matplotlib is imported when the first plot is drawn.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from anomret.metrics.results import METRIC_KEYS, METRIC_LABELS, EvaluationResult, _write_atomic
from anomret.tables import Column, Row, fitted_table

__all__ = [
    "PAPER_DATASETS",
    "Job",
    "PaperRow",
    "PaperTable",
    "ReportError",
    "SweepReport",
    "collect",
    "find_jobs",
    "paper_table",
    "print_report",
    "report_command",
    "write_report",
]

RESULTS = "results.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"
_TRAIN_HINT = "python -m anomret.train +experiment=NAME (add -m and comma lists for a sweep)"
# Metric values closer than this are the same value (sums of the same numbers in another order).
_SAME = 1e-9


class ReportError(Exception):
    """The directories given to the report cannot be turned into a table as they are."""


def _natural_key(text: str) -> list[Any]:
    # Job "10" after job "9": numbers compare as numbers.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _parse_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value`` lines) as key -> value, ``+``/``++`` dropped."""
    try:
        lines = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as error:
        raise ReportError(f"{path} is not a readable Hydra overrides file ({error})") from error
    if not isinstance(lines, list):
        raise ReportError(f"{path} is not a Hydra overrides file: expected a list of key=value lines")
    overrides = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+")
        if key.startswith("~"):  # a deletion: no value
            overrides[key] = ""
        elif sep:
            overrides[key] = value
    return overrides


@dataclass
class Job:
    """One run of the sweep: where it is, its command-line overrides and, once finished, its results."""

    path: Path
    name: str
    overrides: dict[str, str]
    result: EvaluationResult | None

    @property
    def run_settings(self) -> dict[str, Any]:
        run = (self.result.settings.get("run") if self.result else None) or {}
        return run if isinstance(run, dict) else {}

    @property
    def method(self) -> str:
        return str(self.run_settings.get("method") or "?")

    @property
    def dataset(self) -> str:
        return str(self.run_settings.get("dataset") or self.overrides.get("dataset") or "?")


def _read_result(path: Path) -> EvaluationResult:
    try:
        return EvaluationResult.read_json(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReportError(
            f"{path} is not a results file written by anomret ({type(error).__name__}: {error}); "
            "delete it and run the job again"
        ) from error


def find_jobs(dirs: Sequence[str | Path]) -> list[Job]:
    """Every job below ``dirs``: finished ones (``results.json``) and unfinished ones (overrides only).

    Raises:
        ReportError: a directory does not exist or holds no ``results.json`` at all.
    """
    if not dirs:
        raise ReportError("no directory given: pass a multirun directory or one or more run directories")
    job_dirs: dict[Path, bool] = {}
    for entry in dirs:
        root = Path(entry).expanduser()
        if not root.is_dir():
            raise ReportError(
                f"{root} is not a directory: pass a run or multirun directory "
                "(logs/<task_name>/train/<time> or logs/<task_name>/train-multirun/<time>)"
            )
        found = {p.parent.resolve() for p in root.rglob(RESULTS)}
        if not found:
            raise ReportError(
                f"no {RESULTS} anywhere in {root}: the report needs a finished run, written by "
                f"{_TRAIN_HINT} (or python -m anomret.eval ...). A run that failed or is still running "
                f"has no {RESULTS} yet."
            )
        for job in found:
            job_dirs[job] = True
        for overrides in root.rglob(str(OVERRIDES)):
            job_dirs.setdefault(overrides.parent.parent.resolve(), False)
    paths = sorted(job_dirs, key=lambda p: _natural_key(str(p)))
    base = _common_parent(paths)
    jobs = []
    for path in paths:
        overrides_file = path / OVERRIDES
        jobs.append(
            Job(
                path=path,
                name=str(path.relative_to(base)) if path != base else path.name,
                overrides=_parse_overrides(overrides_file) if overrides_file.is_file() else {},
                result=_read_result(path / RESULTS) if job_dirs[path] else None,
            )
        )
    return jobs


def _common_parent(paths: Sequence[Path]) -> Path:
    # Jobs are named by their path below this: "0", "1", ... for one multirun directory.
    return paths[0].parent if len(paths) == 1 else Path(os.path.commonpath(paths))


def _is_nan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _percent(value: float | None) -> str:
    return "–" if value is None or _is_nan(value) else f"{100 * value:.1f}"


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass
class SweepReport:
    """The finished jobs of one or more sweeps, which overrides vary between them, and the unfinished ones.

    Attributes:
        jobs: finished jobs (with results), in job order.
        missing: jobs with overrides but no ``results.json`` (failed, killed or still running).
        swept: override keys whose values differ across the finished jobs, in order of appearance.
        metrics: the metric columns (``METRIC_KEYS``).
    """

    jobs: list[Job]
    missing: list[Job] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = METRIC_KEYS

    # ------------------------------------------------------------------------------------------ rows
    @property
    def columns(self) -> list[str]:
        return ["job", *self.swept, "method", "dataset"]

    def rows(self, per_category: bool = False) -> list[dict[str, Any]]:
        """One dict per job (``per_category``: per job and category, then the job's mean); raw fractions."""
        rows = []
        for job in self.jobs:
            assert job.result is not None
            head = {"job": job.name, **{k: job.overrides.get(k, "") for k in self.swept}}
            head.update(method=job.method, dataset=job.dataset)
            if per_category:
                for category, values in job.result.per_category.items():
                    rows.append({**head, "category": category, **{m: values.get(m) for m in self.metrics}})
                rows.append({**head, "category": "mean", **self.job_mean(job)})
            else:
                rows.append({**head, **self.job_mean(job)})
        return rows

    def job_mean(self, job: Job) -> dict[str, float]:
        """The job's metrics, mean over its categories (NaN where undefined)."""
        assert job.result is not None
        mean = job.result.mean
        return {m: mean.get(m, math.nan) for m in self.metrics}

    def _header(self, per_category: bool) -> list[str]:
        return [*self.columns, *(["category"] if per_category else []), *self.metrics]

    # ------------------------------------------------------------------------------------------ text
    def csv_text(self, per_category: bool = False) -> str:
        """Raw fractions at full precision (as ``results.csv``), undefined metrics empty."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = self._header(per_category)
        writer.writerow([*header, "status"])
        for row in self.rows(per_category):
            writer.writerow(
                [
                    *(
                        ("" if _is_nan(row[k]) else repr(float(row[k]))) if k in self.metrics else row[k]
                        for k in header
                    ),
                    "finished",
                ]
            )
        for job in self.missing:  # failed or unfinished jobs stay visible, with empty metrics
            cells = {"job": job.name, **{k: job.overrides.get(k, "") for k in self.swept}}
            writer.writerow([*(cells.get(k, "") for k in header), "missing"])
        return buffer.getvalue()

    def markdown(self, per_category: bool = False) -> str:
        """A GitHub table in percent with one decimal, as the papers; missing jobs listed below it."""
        header = self._header(per_category)
        labels = [METRIC_LABELS.get(k, k) for k in header]
        lines = [
            "| " + " | ".join(labels) + " |",
            "|" + "|".join("---:" if k in self.metrics else "---" for k in header) + "|",
        ]
        for row in self.rows(per_category):
            cells = [_percent(row[k]) if k in self.metrics else str(row[k]) for k in header]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.extend(self._missing_lines())
        return "\n".join(lines) + "\n"

    def _missing_lines(self) -> list[str]:
        if not self.missing:
            return []
        lines = ["", f"Missing ({len(self.missing)} job(s) without {RESULTS}: failed or not finished):", ""]
        for job in self.missing:
            described = " ".join(f"{k}={v}" for k, v in job.overrides.items()) or "no overrides"
            lines.append(f"- {job.name}: {described}")
        return lines

    def rich_table(
        self, per_category: bool = False, title: str | None = None, width: int | None = None
    ) -> Table:
        """The table in percent; ``width``: the console's width, which the table is made to fit (swept keys
        shortened to their last part, constant columns moved to the caption, names cut with "…")."""
        header = self._header(per_category)
        short = _short_keys(self.swept)
        columns = []
        for key in header:
            if key in self.metrics:
                columns.append(Column(METRIC_LABELS.get(key, key), numeric=True))
            else:
                columns.append(
                    Column(
                        key,
                        short=short.get(key),
                        shrinkable=key in ("job", "dataset", "category") or key in self.swept,
                        movable=key in ("method", "dataset"),
                    )
                )
        rows: list[Row] = []
        previous = None
        for row in self.rows(per_category):
            rule = per_category and previous is not None and row["job"] != previous
            previous = row["job"]
            style = "bold" if per_category and row.get("category") == "mean" else None
            cells = [_percent(row[k]) if k in self.metrics else str(row[k]) for k in header]
            rows.append(Row(cells, style=style, rule_above=rule))
        for job in self.missing:
            cells = [
                job.name,
                *(job.overrides.get(k, "") for k in self.swept),
                "missing",
                "",
                *([""] if per_category else []),
                *("" for _ in self.metrics),
            ]
            rows.append(Row(cells, style="red"))
        notes = [f"{len(self.missing)} job(s) missing"] if self.missing else []
        capped = self.capped_k()
        if capped:
            notes.append("K capped at the memory size: " + ", ".join(f"job {n}: K = {k}" for n, k in capped))
        return fitted_table(columns, rows, width=width, title=title, caption="\n".join(notes) or None)

    def capped_k(self) -> list[tuple[str, int]]:
        """``(job, K used)`` of the jobs whose retrieval K was capped below ``retrieval.k`` (few-shot)."""
        capped = []
        for job in self.jobs:
            retrieval = (job.result.settings if job.result else {}).get("retrieval")
            if isinstance(retrieval, dict) and retrieval.get("k_used") not in (None, retrieval.get("k")):
                capped.append((job.name, int(retrieval["k_used"])))
        return capped

    # ----------------------------------------------------------------------------------------- plots
    def _is_numeric(self, key: str) -> bool:
        return all(_number(job.overrides.get(key)) is not None for job in self.jobs)

    def _categories(self, key: str) -> list[str]:
        return sorted({job.overrides.get(key, "") for job in self.jobs}, key=_natural_key)

    def series(self, key: str, metric: str) -> dict[str, list[tuple[float, float]]]:
        """The lines of one plot: label (the other swept keys' values) -> sorted (x, mean) points.

        x is the key's value when all its values are numbers, else the index of the value in
        :meth:`_categories` order; the mean is a fraction (NaN where undefined).
        """
        numeric, categories = self._is_numeric(key), self._categories(key)
        others = [k for k in self.swept if k != key]
        lines: dict[str, list[tuple[float, float]]] = {}
        for job in self.jobs:
            value = job.overrides.get(key, "")
            x = _number(value) if numeric else categories.index(value)
            assert x is not None  # numeric: every job's value of key is a number
            label = ", ".join(f"{k}={job.overrides.get(k, '')}" for k in others)
            lines.setdefault(label, []).append((float(x), self.job_mean(job)[metric]))
        return {label: sorted(points) for label, points in lines.items()}

    def changes(self, key: str, metric: str) -> bool:
        """Whether ``metric`` takes more than one value along ``key`` on some line of its plot (the
        other swept keys fixed). A pixel metric of a setting that only moves image scores does not."""
        for points in self.series(key, metric).values():
            values = [y for _, y in points if not _is_nan(y)]
            if values and max(values) - min(values) > _SAME:
                return True
        return False

    def changing_metrics(self, key: str) -> list[str]:
        """The metrics that :meth:`changes` with ``key``, in column order."""
        return [metric for metric in self.metrics if self.changes(key, metric)]

    def draw_plots(self) -> dict[str, bytes]:
        """Swept key -> PNG: small multiples, one panel per metric that :meth:`changes` with the key (mean
        over categories, %), against the key's values.

        Numeric values go on a numeric axis, others on a categorical one. Each combination of the other
        swept keys is one line, the same in every panel; lines differ in colour, marker and dashes, and
        markers shrink from line to line so coinciding lines stay visible. The legend sits below the
        panels, never over them. A key that changes no metric gets no plot.
        """
        from anomret.reporting.figures import figure_png, line_style, new_figure

        drawn: dict[str, bytes] = {}
        for key in self.swept:
            metrics = self.changing_metrics(key)
            if not metrics:
                continue
            columns = min(len(metrics), 4)
            rows = math.ceil(len(metrics) / columns)
            legend = len(self.series(key, metrics[0])) > 1
            width, height = 3.3 * columns, 2.6 * rows + (0.9 if legend else 0.4)
            figure = new_figure(width, height, constrained=False)
            # Margins in inches, for the tick labels, the titles and the legend below the panels.
            figure.subplots_adjust(
                left=0.65 / width,
                right=1 - 0.15 / width,
                top=1 - 0.35 / height,
                bottom=(1.05 if legend else 0.55) / height,
                wspace=0.4,
                hspace=0.6,
            )
            panels = figure.subplots(rows, columns, squeeze=False).ravel()
            for axes, metric in zip(panels, metrics, strict=False):
                lines = self.series(key, metric)
                for number, (label, points) in enumerate(lines.items()):
                    axes.plot(
                        [x for x, _ in points],
                        [100 * y for _, y in points],
                        label=label or key,
                        **line_style(number, len(lines)),
                    )
                if not self._is_numeric(key):
                    categories = self._categories(key)
                    axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
                elif len(self._categories(key)) <= 12:  # ticks at the swept values, not between them
                    axes.set_xticks(sorted({x for points in lines.values() for x, _ in points}))
                axes.set_title(METRIC_LABELS.get(metric, metric), fontsize="medium")
                axes.set_xlabel(key, fontsize="small")
                axes.set_ylabel("% (mean)", fontsize="small")
                axes.grid(alpha=0.3)
            for axes in panels[len(metrics) :]:
                axes.set_visible(False)
            if legend:
                handles, labels = panels[0].get_legend_handles_labels()
                figure.legend(handles, labels, loc="lower center", ncol=min(len(handles), 4), frameon=False)
            drawn[key] = figure_png(figure, dpi=90)
        return drawn

    def plot(self, out_dir: str | Path, drawn: dict[str, bytes] | None = None) -> dict[str, Path]:
        """Swept key -> ``<out_dir>/metrics_vs_<key>.png`` of :meth:`draw_plots` (or of ``drawn``)."""
        written = {}
        for key, png in (self.draw_plots() if drawn is None else drawn).items():
            path = Path(out_dir) / f"metrics_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"

            def write_png(handle: Any, png: bytes = png) -> None:
                handle.write(png)

            written[key] = _write_atomic(path, write_png, binary=True)
        return written

    # ---------------------------------------------------------------------------------------- write
    def write(
        self, out_dir: str | Path, per_category: bool = False, plots: bool = True, plot_files: bool = True
    ) -> list[Path]:
        """``report.csv`` and ``report.md`` (plus per-category versions), ``plots/*.png`` and
        ``report.html``: the run page of a single run reported in its own directory, else the sweep page
        and the run page of each job below ``out_dir``. Atomic writes.

        Args:
            plots: draw the sweep plots (``False``: tables and pages only, the quickest report).
            plot_files: also write them to ``plots/``; the sweep page holds its plots itself, so without
                them ``out_dir`` gains no folder.
        """
        from anomret.reporting.page import write_run_page, write_sweep_page

        out_dir = Path(out_dir)
        written = [
            _write_atomic(out_dir / "report.csv", lambda h: h.write(self.csv_text())),
            _write_atomic(out_dir / "report.md", lambda h: h.write(self.markdown())),
        ]
        if per_category:
            written += [
                _write_atomic(out_dir / "report_per_category.csv", lambda h: h.write(self.csv_text(True))),
                _write_atomic(out_dir / "report_per_category.md", lambda h: h.write(self.markdown(True))),
            ]
        drawn = self.draw_plots() if plots else None
        if drawn and plot_files:
            written += self.plot(out_dir / "plots", drawn).values()
        if self.is_single_run(out_dir):
            written.append(write_run_page(self.jobs[0].path, out_dir))
            return written
        for job in self.jobs:  # figures of single runs only: a sweep's jobs keep those already drawn
            if job.path.resolve().is_relative_to(out_dir.resolve()):
                written.append(write_run_page(job.path, figures=False))
        written.append(write_sweep_page(self, out_dir, drawn))
        return written

    def is_single_run(self, out_dir: str | Path) -> bool:
        """One finished job and nothing else, reported in its own directory: a run, not a sweep."""
        return (
            len(self.jobs) == 1
            and not self.missing
            and self.jobs[0].path.resolve() == Path(out_dir).resolve()
        )


def collect(dirs: Sequence[str | Path], allow_mixed: bool = False) -> SweepReport:
    """Gather the jobs below ``dirs`` into a :class:`SweepReport`.

    Raises:
        ReportError: no results anywhere, or jobs of different methods without ``allow_mixed``.
    """
    jobs = find_jobs(dirs)
    finished = [job for job in jobs if job.result is not None]
    missing = [job for job in jobs if job.result is None]
    methods = sorted({job.method for job in finished})
    if len(methods) > 1 and not allow_mixed:
        listing = "\n".join(
            f"  {method}: " + ", ".join(job.name for job in finished if job.method == method)
            for method in methods
        )
        raise ReportError(
            f"the jobs are of {len(methods)} different methods:\n{listing}\n"
            "report each method's directory separately, or pass --allow-mixed to put them in one table"
        )
    keys: list[str] = []
    for job in finished:
        keys += [k for k in job.overrides if k not in keys]
    swept = [k for k in keys if len({job.overrides.get(k) for job in finished}) > 1]
    return SweepReport(finished, missing, swept)


# ---------------------------------------------------------------------------------------- --paper
@dataclass(frozen=True)
class PaperDataset:
    name: str  # anomret's dataset name (conf/dataset/<name>.yaml)
    label: str  # as printed in the paper
    group: str  # "Industrial" or "Medical"
    image: bool  # a row of Table 1(b), image level
    pixel: bool  # a row of Table 1(a), pixel level


# MRAD Table 1 rows in the paper's order: (a) pixel level lists the 8 industrial sets and the 5 medical sets
# with masks; (b) image level the 8 industrial sets and the 3 image-only medical sets. Its "Average" rows are
# the mean over the datasets of each sub-table.
PAPER_DATASETS = (
    PaperDataset("mvtec", "MVTec-AD", "Industrial", True, True),
    PaperDataset("visa", "VisA", "Industrial", True, True),
    PaperDataset("btad", "BTAD", "Industrial", True, True),
    PaperDataset("mpdd", "MPDD", "Industrial", True, True),
    PaperDataset("dtd", "DTD-Synthetic", "Industrial", True, True),
    PaperDataset("sdd", "SDD", "Industrial", True, True),
    PaperDataset("ksdd2", "KSDD2", "Industrial", True, True),
    PaperDataset("dagm", "DAGM", "Industrial", True, True),
    PaperDataset("isic", "ISIC", "Medical", False, True),
    PaperDataset("colondb", "CVC-ColonDB", "Medical", False, True),
    PaperDataset("clinicdb", "CVC-ClinicDB", "Medical", False, True),
    PaperDataset("kvasir", "Kvasir", "Medical", False, True),
    PaperDataset("endo", "Endo", "Medical", False, True),
    PaperDataset("headct", "HeadCT", "Medical", True, False),
    PaperDataset("brainmri", "BrainMRI", "Medical", True, False),
    PaperDataset("br35h", "Br35H", "Medical", True, False),
)
PAPER_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
_IMAGE_METRICS = {"image_auroc", "image_ap"}


@dataclass
class PaperRow:
    label: str
    group: str
    values: dict[str, float]  # metric -> fraction (NaN where undefined)
    job: str = ""


@dataclass
class PaperTable:
    """MRAD Table 1: one row per target dataset (industrial, then medical), then the paper's Average."""

    rows: list[PaperRow]
    average: dict[str, float]
    counts: dict[str, tuple[int, int]]  # metric -> (datasets averaged, datasets in the paper's sub-table)
    method: str

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["group", "dataset", *(METRIC_LABELS[m] for m in PAPER_METRICS), "job"])
        for row in [*self.rows, PaperRow("Average", "", self.average)]:
            writer.writerow(
                [row.group, row.label, *(_percent(row.values.get(m)) for m in PAPER_METRICS), row.job]
            )
        return buffer.getvalue()

    def markdown(self) -> str:
        lines = [
            f"MRAD Table 1 layout ({self.method}), % with one decimal.",
            "",
            "| dataset | " + " | ".join(METRIC_LABELS[m] for m in PAPER_METRICS) + " |",
            "|---|" + "---:|" * len(PAPER_METRICS),
        ]
        group = None
        for row in self.rows:
            if row.group != group:
                group = row.group
                lines.append(f"| *{group}* |" + " |" * len(PAPER_METRICS))
            lines.append(
                f"| {row.label} | " + " | ".join(_percent(row.values.get(m)) for m in PAPER_METRICS) + " |"
            )
        lines.append(
            "| **Average** | " + " | ".join(f"**{_percent(self.average[m])}**" for m in PAPER_METRICS) + " |"
        )
        lines += ["", self.average_note()]
        return "\n".join(lines) + "\n"

    def average_note(self) -> str:
        parts = [f"{METRIC_LABELS[m]} {n} of {total}" for m, (n, total) in self.counts.items()]
        return (
            "Average: mean over the paper's datasets of each sub-table (image level: 8 industrial + 3 "
            "medical, pixel level: 8 industrial + 5 medical) present here — " + ", ".join(parts) + "."
        )

    def rich_table(self) -> Table:
        table = Table(title=f"MRAD Table 1 layout: {self.method}", caption=self.average_note())
        table.add_column("dataset", no_wrap=True)
        for metric in PAPER_METRICS:
            table.add_column(METRIC_LABELS[metric], justify="right")
        group = None
        for row in self.rows:
            if row.group != group:
                if group is not None:
                    table.add_section()
                group = row.group
                table.add_row(f"[italic]{group}[/italic]", *("" for _ in PAPER_METRICS))
            table.add_row(row.label, *(_percent(row.values.get(m)) for m in PAPER_METRICS))
        table.add_section()
        table.add_row("Average", *(_percent(self.average[m]) for m in PAPER_METRICS), style="bold")
        return table

    def write(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        return [
            _write_atomic(out_dir / "paper_table1.csv", lambda h: h.write(self.csv_text())),
            _write_atomic(out_dir / "paper_table1.md", lambda h: h.write(self.markdown())),
        ]


def paper_table(report: SweepReport) -> PaperTable:
    """Lay a cross-dataset sweep out as MRAD's Table 1 (datasets the paper does not list come last).

    Raises:
        ReportError: two jobs evaluate the same dataset (the table has one row per dataset).
    """
    by_dataset: dict[str, Job] = {}
    for job in report.jobs:
        if job.dataset in by_dataset:
            raise ReportError(
                f"--paper needs one job per dataset, but jobs {by_dataset[job.dataset].name} and {job.name} "
                f"both evaluate {job.dataset!r}; report a sweep over dataset= only (other keys fixed), "
                "or leave out --paper"
            )
        by_dataset[job.dataset] = job
    rows: list[PaperRow] = []
    counted: dict[str, list[float]] = {m: [] for m in PAPER_METRICS}
    known = {d.name: d for d in PAPER_DATASETS}
    for spec in PAPER_DATASETS:
        listed = by_dataset.get(spec.name)
        if listed is None:
            continue
        values = report.job_mean(listed)
        rows.append(PaperRow(spec.label, spec.group, {m: values[m] for m in PAPER_METRICS}, listed.name))
        for metric in PAPER_METRICS:
            in_table = spec.image if metric in _IMAGE_METRICS else spec.pixel
            if in_table and not _is_nan(values[metric]):
                counted[metric].append(values[metric])
    for name in sorted(set(by_dataset) - set(known), key=_natural_key):
        values = report.job_mean(by_dataset[name])
        rows.append(
            PaperRow(
                name, "Other (not in the paper)", {m: values[m] for m in PAPER_METRICS}, by_dataset[name].name
            )
        )
    totals = {
        m: sum(d.image if m in _IMAGE_METRICS else d.pixel for d in PAPER_DATASETS) for m in PAPER_METRICS
    }
    average = {m: math.fsum(v) / len(v) if v else math.nan for m, v in counted.items()}
    methods = sorted({job.method for job in report.jobs})
    return PaperTable(
        rows, average, {m: (len(counted[m]), totals[m]) for m in PAPER_METRICS}, ", ".join(methods)
    )


# -------------------------------------------------------------------------------------------- CLI
def _default_out(dirs: Sequence[str | Path]) -> Path:
    paths = [Path(d).expanduser().resolve() for d in dirs]
    return paths[0] if len(paths) == 1 else _common_parent(paths)


def report_command(directory: str | Path) -> str:
    """The command that reports ``directory`` again, as a user would type it."""
    import shlex

    return f"python -m anomret.report {shlex.quote(str(directory))}"


def write_report(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    per_category: bool = False,
    plots: bool = True,
    plot_files: bool = True,
    allow_mixed: bool = False,
    paper: bool = False,
) -> tuple[SweepReport, PaperTable | None, Path, list[Path]]:
    """Collect the jobs below ``dirs`` and write every report file into ``out`` (default: DIR, or the
    common parent of several); returns the report, the paper table (``paper``), ``out`` and the files.

    Raises:
        ReportError: see :func:`collect` and :func:`paper_table`.
    """
    report = collect(dirs, allow_mixed=allow_mixed)
    out_dir = Path(out).expanduser() if out else _default_out(dirs)
    written = report.write(out_dir, per_category=per_category, plots=plots, plot_files=plot_files)
    table = paper_table(report) if paper else None
    if table is not None:
        written += table.write(out_dir)
    return report, table, out_dir, written


def print_report(
    console: Console,
    report: SweepReport,
    table: PaperTable | None = None,
    per_category: bool = False,
    out_dir: str | Path | None = None,
) -> None:
    """The report's tables, fitted to the console's width, and the jobs that have no results; a single run
    reported in its own directory (``out_dir``) gets its per-category table."""
    if out_dir is not None and report.is_single_run(out_dir):
        job = report.jobs[0]
        assert job.result is not None
        title = f"{job.path.name}: {job.dataset} ({job.method})"
        console.print(job.result.rich_table(title=title, width=console.width))
    else:
        console.print(
            report.rich_table(per_category, title=f"{len(report.jobs)} job(s)", width=console.width)
        )
    if table is not None:
        console.print(table.rich_table())
    if report.missing:
        console.print(
            f"[red]{len(report.missing)} job(s) have no {RESULTS} (failed or not finished):[/red] "
            + ", ".join(job.name for job in report.missing)
        )


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest tail that no other key shares (``retrieval.k`` -> ``k``)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for size in range(1, len(parts) + 1):
            tail = ".".join(parts[-size:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                short[key] = tail
                break
    return short
