"""Start-up of ``hpo worker``: from its launch to its first trial's start, against the imports any
process training that objective pays.

The worker is a real CLI process on a new SQLite study of one digits-MLP trial (one epoch),
created beforehand (not timed). Its start-up is the time from launching it to the start of its
first trial as the storage records it (``datetime_start``: claimed once the trainer process is
ready to train it, its imports done). The baseline, run in alternation with it, is a fresh Python
process that imports the objective's module (PyTorch, scikit-learn) and builds one optimizer (which
imports ``torch._dynamo``): the least a process running that trial has to do before it trains.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/worker_startup.py [--rounds 5]

Medians over the rounds are printed, with their ratio (worker / imports). Machines here are
noisy: compare only within a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name: startup
objective: digits_mlp
data: {val_fraction: 0.2}
settings: {hidden_units: 128, hidden_layers: 2, optimizer: adam, batch_size: 64, scheduler: none}
search_space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
metric: val_loss
direction: minimize
n_trials: 1
budget: {max_epochs: 1}
seed: 0
sampler: random
"""

IMPORTS = "import objectives.digits, torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)"


def imports_seconds(env: dict[str, str]) -> float:
    """Wall seconds of a fresh Python importing the objective and building one optimizer."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def worker_seconds(folder: Path, env: dict[str, str]) -> tuple[float, float]:
    """(launch to first trial's start, whole worker) in seconds, on a new study in ``folder``."""
    folder.mkdir(parents=True)
    study_file = folder / "startup.yaml"
    study_file.write_text(STUDY)
    url = f"sqlite:///{folder / 'startup.db'}"
    hpo = [sys.executable, "-m", "hpo"]
    subprocess.run(
        [*hpo, "create-study", str(study_file), "--storage", url],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(
        [
            *hpo,
            "worker",
            "--study-name",
            "startup",
            "--storage",
            url,
            "--no-progress",
            "--checkpoint-dir",
            str(folder / "checkpoints"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"hpo worker failed:\n{done.stdout}\n{done.stderr}")
    (trial,) = optuna.load_study(study_name="startup", storage=url).trials
    assert trial.datetime_start is not None
    # Optuna stores naive local times, as datetime.now() gives them.
    return trial.datetime_start.timestamp() - launched, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating pairs (default 5)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    env.pop("OPTUNA_STORAGE", None)
    imports, starts, wholes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            imports.append(imports_seconds(env))
            first, whole = worker_seconds(Path(tmp) / f"r{round_}", env)
            starts.append(first)
            wholes.append(whole)
            print(
                f"round {round_}: imports {imports[-1]:.2f} s, worker to first trial {first:.2f} s "
                f"(whole worker {whole:.2f} s)",
                flush=True,
            )
    floor, start = statistics.median(imports), statistics.median(starts)
    print(
        f"hpo worker start-up (launch to first trial started, digits MLP, SQLite, {args.rounds} rounds, "
        f"medians): {start:.2f} s vs {floor:.2f} s for a fresh process's imports: ratio {start / floor:.2f}x "
        f"(whole one-trial worker {statistics.median(wholes):.2f} s)"
    )


if __name__ == "__main__":
    main()
