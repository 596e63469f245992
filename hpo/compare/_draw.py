"""Plotly figures from the report's data (:mod:`hpo.compare._stats`); no numbers are computed here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from hpo.compare._stats import Axis, Band, ConfigPoints

AXIS_TITLES: Mapping[Axis, str] = {
    "trials": "finished trials",
    "epochs": "consumed epochs (all trials, pruned ones included)",
    "time": "active time (s)",
}
_PALETTE = qualitative.D3


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
) -> go.Figure:
    """Best-so-far ``metric`` against ``axis``: one line (the statistic) and band per algorithm.
    ``simulated``: the time axis is a replay's simulated clock."""
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
                line={"color": _colour(i), "width": 2, "shape": "hv"},
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
    return fig


def _axis_kind(space: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    entry = space.get(name, {})
    if entry.get("type") == "categorical":
        return {"type": "category"}
    return {"type": "log"} if entry.get("log") else {}


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
    Figure 1, with every seed)."""
    samplers = list(points)
    fig = make_subplots(rows=1, cols=max(1, len(samplers)), subplot_titles=samplers, shared_yaxes=True)
    values = [v for p in points.values() for v in p.value if v is not None]
    cmin, cmax = (min(values), max(values)) if values else (0.0, 1.0)
    for col, sampler in enumerate(samplers, start=1):
        p = points[sampler]
        done = [i for i, v in enumerate(p.value) if v is not None]
        other = [i for i, v in enumerate(p.value) if v is None]
        best = [i for i in done if p.is_run_best[i]]
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
                text=[f"seed {p.seed[i]}: {p.state[i]}" for i in other],
                showlegend=col == 1,
                legendgroup="other",
            ),
            row=1,
            col=col,
        )
        for subset, symbol, size, name in (
            (done, "circle", 8, "completed"),
            (best, "star", 16, "best of a seed"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=[p.x[i] for i in subset],
                    y=[p.y[i] for i in subset],
                    mode="markers",
                    marker={
                        "symbol": symbol,
                        "size": size,
                        "color": [p.value[i] for i in subset],
                        "coloraxis": "coloraxis",
                        "line": {"width": 1.5 if symbol == "star" else 0.5, "color": "black"},
                    },
                    name=name,
                    text=[f"seed {p.seed[i]}: {metric}={p.value[i]:.4g}" for i in subset],
                    showlegend=col == 1,
                    legendgroup=name,
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=x_param, row=1, col=col, **_axis_kind(space, x_param))
    fig.update_yaxes(title_text=y_param or metric, row=1, col=1)
    fig.update_yaxes(**_axis_kind(space, y_param))
    better = "lower" if direction == "minimize" else "higher"
    fig.update_layout(
        title=f"tested configurations, coloured by {metric} ({better} is better)",
        template="plotly_white",
        # green = good whichever the direction
        coloraxis={
            "colorscale": "RdYlGn",
            "reversescale": direction == "minimize",
            "cmin": cmin,
            "cmax": cmax,
            "colorbar": {"title": {"text": metric}},
        },
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
