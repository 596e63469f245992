"""Study files for the quadratic test objective, written into a test's tmp folder."""

from __future__ import annotations

from pathlib import Path


def quadratic_study(
    directory: Path,
    *,
    name: str = "quad",
    sampler: str = "tpe",
    n_trials: int | None = 6,
    epochs: int = 3,
    sleep: float = 0.0,
    objective: str = "hpo_test_objectives:quadratic",
    grid_x: list[float] | None = None,
    grid_y: list[float] | None = None,
    pruner: str = "none",
    direction: str = "minimize",
    filename: str | None = None,
) -> Path:
    x = "{type: float, low: -5, high: 5" + (f", grid: {grid_x}" if grid_x else "") + "}"
    y = "{type: float, low: -5, high: 5" + (f", grid: {grid_y}" if grid_y else "") + "}"
    lines = [
        f"name: {name}",
        f"objective: {objective}",
        f"settings: {{sleep: {sleep}}}",
        "search_space:",
        f"  x: {x}",
        f"  y: {y}",
        "metric: loss",
        f"direction: {direction}",
        f"budget: {{max_epochs: {epochs}}}",
        f"sampler: {{name: {sampler}, seed: 7}}",
        f"pruner: {{name: {pruner}}}",
    ]
    if n_trials is not None:
        lines.append(f"n_trials: {n_trials}")
    path = directory / (filename or f"{name}.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path
