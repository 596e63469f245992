"""Plotly figures from the report's data (:mod:`hpo.compare._stats`); no numbers are computed here."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from hpo.compare._stats import Axis, Band, ConfigPoints, colour_range, sign

AXIS_TITLES: Mapping[Axis, str] = {
    "trials": "finished trials",
    "epochs": "consumed epochs (all trials, pruned ones included)",
    "time": "active time (s)",
}
_PALETTE = qualitative.D3
# One dash pattern per algorithm (the first solid): where two curves coincide, the one drawn on top
# is dashed or dotted, so the one under it still shows through its gaps.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
# Green is good whichever the direction (see value_colour).
_SCALE = "RdYlGn"


def _colour(i: int, alpha: float | None = None) -> str:
    hex_colour = _PALETTE[i % len(_PALETTE)].lstrip("#")
    r, g, b = (int(hex_colour[k : k + 2], 16) for k in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})" if alpha is not None else f"rgb({r},{g},{b})"


def _finite(x: Sequence[float], *ys: Sequence[float]) -> list[list[float]]:
    keep = [i for i in range(len(x)) if all(not math.isnan(y[i]) for y in ys)]
    return [[x[i] for i in keep], *[[y[i] for i in keep] for y in ys]]


def curve_figure(
    bands: Mapping[str, Band],
    axis: Axis,
    metric: str,
    statistic: str,
    band_label: str,
    title: str,
    simulated: bool = False,
    notes: Sequence[str] = (),
) -> go.Figure:
    """Best-so-far ``metric`` against ``axis``: one line (the statistic) and band per algorithm,
    each with its own colour and dash pattern. ``simulated``: the time axis is a replay's simulated
    clock. ``notes`` (e.g. where curves coincide) are written under the title."""
    fig = go.Figure()
    for i, (sampler, band) in enumerate(bands.items()):
        x, center, low, high = _finite(band.x, band.center, band.low, band.high)
        if not x:
            continue
        # The band is drawn as steps, like the curves: between two events nothing changes.
        fig.add_trace(
            go.Scatter(
                x=x,
                y=low,
                mode="lines",
                line={"width": 0, "shape": "hv"},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=sampler,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=high,
                mode="lines",
                fill="tonexty",
                fillcolor=_colour(i, 0.2),
                line={"width": 0, "shape": "hv"},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=sampler,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=center,
                mode="lines",
                line={"color": _colour(i), "width": 2, "shape": "hv", "dash": DASHES[i % len(DASHES)]},
                name=f"{sampler} ({band.n_runs} seeds)",
                legendgroup=sampler,
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="simulated time (s, one worker)" if simulated and axis == "time" else AXIS_TITLES[axis],
        yaxis_title=f"best {metric} so far ({statistic}, band: {band_label})",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
    )
    if notes:
        lines = [line for note in notes for line in textwrap.wrap(note, 140)]
        fig.add_annotation(
            text="<br>".join(lines),
            xref="paper",
            yref="paper",
            x=0.0,
            y=1.0,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            align="left",
            font={"size": 11},
        )
        fig.update_layout(margin={"t": 90 + 15 * len(lines)})
    return fig


def _axis_kind(space: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    entry = space.get(name, {})
    if entry.get("type") == "categorical":
        return {"type": "category"}
    return {"type": "log"} if entry.get("log") else {}


def value_colour(value: float, best: float, limit: float, direction: str) -> str:
    """The colour of ``value`` on the configurations picture's scale: green at ``best``, through
    yellow, to red at ``limit`` and beyond (see :func:`hpo.compare._stats.colour_range`)."""
    s = sign(direction)
    span = s * (limit - best)
    badness = 0.0 if span <= 0 else min(1.0, max(0.0, s * (value - best) / span))
    return str(sample_colorscale(_SCALE, [1.0 - badness])[0])


def _sampled_text(p: ConfigPoints, i: int, x_param: str, y_param: str | None) -> str:
    """Hover text of a replayed point: what the sampler asked for, when it differs from the table."""
    if not p.replayed:
        return ""
    asked = [(x_param, p.x[i], p.sampled_x[i])]
    if y_param is not None:
        asked.append((y_param, p.y[i], p.sampled_y[i]))
    differ = [f"{name}={sampled:.4g}" for name, shown, sampled in asked if sampled != shown]
    return f" (sampled {', '.join(differ)})" if differ else ""


def configurations_figure(
    points: Mapping[str, ConfigPoints],
    space: Mapping[str, Any],
    x_param: str,
    y_param: str | None,
    metric: str,
    direction: str,
) -> go.Figure:
    """The tested configurations of each algorithm (all seeds) in the search space, coloured by
    ``metric``; pruned and failed trials are grey crosses, each seed's best a star (report 002's
    Figure 1, with every seed). Replayed trials are drawn at the tabulated configuration they
    replayed.

    Every marker's colour is computed here from its own value on one scale shared by all
    algorithms (:func:`value_colour`), written into the figure as a colour string: numbers handed to
    plotly as colours made its legend log "Invalid color specifier" and leave the mapping implicit.
    """
    samplers = list(points)
    fig = make_subplots(rows=1, cols=max(1, len(samplers)), subplot_titles=samplers, shared_yaxes=True)
    values = [v for p in points.values() for v in p.value if v is not None]
    best, limit = colour_range(values, direction)
    replayed = any(p.replayed for p in points.values())
    for col, sampler in enumerate(samplers, start=1):
        p = points[sampler]
        # Worse values are drawn last, on top: where markers share a spot (seeds replaying the same
        # tabulated configuration, or BOHB's budgets), a bad result is never hidden under a good one.
        done = sorted(
            (i for i, v in enumerate(p.value) if v is not None),
            key=lambda i: sign(direction) * (p.value[i] or 0.0),
        )
        other = [i for i, v in enumerate(p.value) if v is None]
        best_points = [i for i in done if p.is_run_best[i]]
        fig.add_trace(
            go.Scatter(
                x=[p.x[i] for i in other],
                y=[p.y[i] for i in other],
                mode="markers",
                marker={
                    "symbol": "x-thin",
                    "size": 7,
                    "color": "rgba(120,120,120,0.7)",
                    "line": {"width": 1},
                },
                name="pruned / failed",
                text=[
                    f"seed {p.seed[i]}: {p.state[i]}{_sampled_text(p, i, x_param, y_param)}" for i in other
                ],
                showlegend=False,
                legendgroup="other",
            ),
            row=1,
            col=col,
        )
        for subset, symbol, size, name in (
            (done, "circle", 8, "completed"),
            (best_points, "star", 16, "best of a seed"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=[p.x[i] for i in subset],
                    y=[p.y[i] for i in subset],
                    mode="markers",
                    marker={
                        "symbol": symbol,
                        "size": size,
                        "color": [
                            value_colour(float(p.value[i] or 0.0), best, limit, direction) for i in subset
                        ],
                        "line": {"width": 1.5 if symbol == "star" else 0.5, "color": "black"},
                    },
                    name=name,
                    text=[
                        f"seed {p.seed[i]}: {metric}={p.value[i]:.4g}{_sampled_text(p, i, x_param, y_param)}"
                        for i in subset
                    ],
                    showlegend=False,
                    legendgroup=name,
                ),
                row=1,
                col=col,
            )
        title = f"{x_param} (tabulated value replayed)" if replayed else x_param
        fig.update_xaxes(title_text=title, row=1, col=col, **_axis_kind(space, x_param))
    # Legend entries and the colour bar as marker-less proxies with plain colours.
    for symbol, size, name, colour in (
        ("x-thin", 7, "pruned / failed", "rgba(120,120,120,0.7)"),
        ("circle", 8, "completed", "rgb(255,255,255)"),
        ("star", 16, "best of a seed", "rgb(255,255,255)"),
    ):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={
                    "symbol": symbol,
                    "size": size,
                    "color": colour,
                    "line": {"width": 1, "color": "black"},
                },
                name=name,
                legendgroup=name if name != "pruned / failed" else "other",
            ),
            row=1,
            col=1,
        )
    low, high = sorted((best, limit))
    beyond = "≥" if direction == "minimize" else "≤"
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker={
                "colorscale": _SCALE,
                "reversescale": direction == "minimize",  # green = good whichever the direction
                "cmin": low,
                "cmax": high,
                "color": [best],  # a colour bar needs a numeric colour; this point is never drawn
                "showscale": True,
                "colorbar": {
                    "title": {"text": metric},
                    "tickvals": [best, (best + limit) / 2, limit],
                    "ticktext": [f"{best:.4g}", f"{(best + limit) / 2:.4g}", f"{beyond} {limit:.4g}"],
                },
            },
        ),
        row=1,
        col=1,
    )
    y_title = y_param or metric
    if replayed and y_param is not None:
        y_title = f"{y_param} (tabulated value replayed)"
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_yaxes(**_axis_kind(space, y_param))
    better = "lower" if direction == "minimize" else "higher"
    fig.update_layout(
        title=f"tested configurations, coloured by {metric} ({better} is better; "
        f"{beyond} {limit:.4g}, the median of all completed trials, is red)",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def final_best_figure(bests: Mapping[str, Sequence[float]], metric: str) -> go.Figure:
    """Each seed's final best per algorithm (box with every seed shown)."""
    fig = go.Figure()
    for i, (sampler, values) in enumerate(bests.items()):
        fig.add_trace(
            go.Box(
                y=list(values),
                name=sampler,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": _colour(i)},
                line={"color": _colour(i)},
            )
        )
    fig.update_layout(
        title=f"final best {metric} of each seed",
        yaxis_title=f"final best {metric}",
        template="plotly_white",
        showlegend=False,
    )
    return fig
