"""Writing a comparison report: ``results.json``, ``report.md``, a self-contained ``report.html``
and PNG images, all from the same computed data."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from hpo.compare import _draw, _markdown, _stats
from hpo.compare._results import ComparisonResults
from hpo.errors import HpoError

PNG_FIX = (
    "pip install 'kaleido>=1,<2' and install Chrome or Chromium (Debian: apt-get install chromium), "
    "or pass --no-png"
)


@dataclass(frozen=True)
class ReportOptions:
    statistic: _stats.Statistic = "median"
    band: _stats.BandKind = "iqr"
    target: float | None = None
    reference: str = "random"
    axes: tuple[str, ...] = ()
    png: bool = True


@dataclass(frozen=True)
class Report:
    directory: Path
    files: tuple[Path, ...]
    rows: tuple[_stats.SamplerSummary, ...]


def _figures(
    results: ComparisonResults, options: ReportOptions
) -> tuple[dict[str, tuple[str, go.Figure]], dict[str, list[str]]]:
    """The figures by file name (title, figure), and per figure title the notes to print with it."""
    band_label = "25-75 %" if options.band == "iqr" else "95 % bootstrap CI"
    figures: dict[str, tuple[str, go.Figure]] = {}
    notes: dict[str, list[str]] = {}
    for axis in _stats.AXES:
        bands = _stats.curve_bands(results, axis, options.statistic, options.band)
        title = f"best {results.metric} so far against {_draw.AXIS_TITLES[axis].split(' (')[0]}"
        # a curve hidden under another must be said: the reader would take it for missing
        found = _markdown.coincidence_note(_stats.coinciding_curves(bands), axis)
        notes[title] = [found] if found else []
        if found and axis == "trials":  # why, said once: runs that start with the same trials
            notes[title] += _markdown.shared_trials_notes(results)
        figures[f"best_vs_{axis}"] = (
            title,
            _draw.curve_figure(
                bands,
                axis,
                results.metric,
                options.statistic,
                band_label,
                title,
                results.replay_table is not None,
                notes[title],
            ),
        )
    x_param, y_param = _stats.plot_axes(results.space, options.axes)
    for name in (x_param, y_param):
        if name is not None and name not in results.space:
            raise HpoError(
                f"--axes: {name!r} is not a parameter (fix: use names from {', '.join(results.space)})"
            )
    points = _stats.configurations(results, x_param, y_param)
    figures["configurations"] = (
        "tested configurations",
        _draw.configurations_figure(
            points, results.space, x_param, y_param, results.metric, results.direction
        ),
    )
    bests = {
        s: [b for r in results.runs_of(s) if (b := _stats.final_best(r, results.direction)) is not None]
        for s in results.samplers
    }
    figures["final_best"] = ("final best of each seed", _draw.final_best_figure(bests, results.metric))
    if any(p.replayed for p in points.values()):
        notes["tested configurations"] = [
            "each replayed trial is drawn at the tabulated configuration whose curve it replayed (the "
            "nearest to what its sampler asked for; hover a point for the sampled values)."
        ]
    return figures, {title: found for title, found in notes.items() if found}


def _html(
    results: ComparisonResults,
    rows: list[_stats.SamplerSummary],
    figures: dict[str, tuple[str, go.Figure]],
    options: ReportOptions,
    notes: dict[str, list[str]],
) -> str:
    header = [h.replace("reference", options.reference) for h in _markdown.HEADER]
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in _markdown.table_rows(rows)
    )
    paragraphs = "".join(
        f'<p class="{"replay" if p.startswith("REPLAYED") else ""}">{html.escape(p)}</p>'
        for p in _markdown.describe(results, options.statistic, options.band)
    )
    plots = []
    for i, (title, fig) in enumerate(figures.values()):
        # plotly.js is inlined once, so the file works offline
        said = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes.get(title, ()))
        plots.append(
            f"<h2>{html.escape(title)}</h2>{said}" + fig.to_html(full_html=False, include_plotlyjs=i == 0)
        )
    note = html.escape(_markdown.target_note(rows, options.reference, options.target is not None))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>comparison {html.escape(results.name)}</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}.replay{background:#fff3cd;padding:8px;border-left:4px solid #f0ad4e}"
        ".note{background:#eef5fb;padding:6px;border-left:4px solid #5b9bd5}"
        f"</style></head><body><h1>comparison {html.escape(results.name)}</h1>{paragraphs}"
        f"<table><tr>{cells}</tr>{body}</table><p>{note}</p>{''.join(plots)}</body></html>\n"
    )


def write_report(results: ComparisonResults, directory: Path, options: ReportOptions) -> Report:
    """Write the report files into ``directory``; PNG export problems raise :class:`HpoError` after
    the JSON, Markdown and HTML files are written."""
    if not results.runs:
        raise HpoError(f"comparison {results.name!r} has no runs to report")
    directory.mkdir(parents=True, exist_ok=True)
    rows = _stats.summarize(results, options.target, options.reference)
    figures, notes = _figures(results, options)
    results_path = directory / "results.json"
    results.save(results_path)
    images = [(title, f"{name}.png") for name, (title, _) in figures.items()] if options.png else []
    md_path = directory / "report.md"
    md_path.write_text(
        _markdown.report_markdown(
            results,
            rows,
            images,
            options.statistic,
            options.band,
            options.reference,
            options.target is not None,
            notes,
        )
    )
    html_path = directory / "report.html"
    html_path.write_text(_html(results, rows, figures, options, notes))
    files = [results_path, md_path, html_path]
    if options.png:
        pngs = [directory / f"{name}.png" for name in figures]
        try:
            pio.write_images(
                [fig for _, fig in figures.values()], pngs, width=[1100] * len(pngs), height=[550] * len(pngs)
            )
        except Exception as exc:  # kaleido reports a missing browser or package in many ways
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HpoError(
                f"wrote {html_path} and {md_path}, but cannot write PNG images: {reason} (fix: {PNG_FIX})"
            ) from None
        files += pngs
    return Report(directory, tuple(files), tuple(rows))
