"""Cost of ``hpo worker --backend ray`` against plain workers, same study, same machine.

The study: ``--trials`` trials of ``hpo_test_objectives:quadratic`` (``--epochs`` epochs of
``--sleep`` seconds each, no pruning), on a fresh PostgreSQL database per run. Measured in the
same run, ``--rounds`` times alternating, through the CLI as a user runs it:

* baseline: two plain ``hpo worker`` processes side by side (2 trials at a time);
* ray: one ``hpo worker --backend ray`` on a local Ray instance of 2 CPUs (2 trials at a time).

Prints, per side, the median wall time of the whole command, the time until the first trial
started, the time the trials themselves ran (first start to last finish), and the ratios ray /
baseline. ``ideal`` is the training time alone: trials x epochs x sleep / 2.

Run: ``.venv/bin/python benchmarks/ray_overhead.py [--trials 12] [--epochs 5] [--sleep 0.2]``
(needs PostgreSQL: ``HPO_TEST_POSTGRES_URL``, default the local server with database test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
STUDY = """
name: bench_ray
objective: hpo_test_objectives:quadratic
settings: {{sleep: {sleep}}}
search_space:
  x: {{type: float, low: -5, high: 5}}
  y: {{type: float, low: -5, high: 5}}
metric: loss
direction: minimize
n_trials: {trials}
budget: {{max_epochs: {epochs}}}
sampler: {{name: random, seed: 0}}
"""


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT)])
    out["CUDA_VISIBLE_DEVICES"] = ""
    out["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": 2, "GPU": 0})
    out["RAY_USAGE_STATS_ENABLED"] = "0"
    out.pop("RAY_ADDRESS", None)
    return out


def fresh_db(admin: sqlalchemy.Engine, admin_url: str) -> tuple[str, str]:
    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    return sqlalchemy.engine.make_url(admin_url).set(database=name).render_as_string(
        hide_password=False
    ), name


def run_side(side: str, study_file: Path, url: str, workdir: Path) -> dict[str, float]:
    hpo = [sys.executable, "-m", "hpo", "worker"]
    common = ["--storage", url, "--checkpoint-dir", str(workdir / "ck"), "--no-progress"]
    create = subprocess.run(
        [sys.executable, "-m", "hpo", "create-study", str(study_file), "--storage", url],
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert create.returncode == 0, create.stderr
    launched = time.time()
    if side == "ray":
        procs = [
            subprocess.Popen(
                [*hpo, "--study-name", "bench_ray", *common, "--backend", "ray"],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
    else:
        procs = [
            subprocess.Popen(
                [*hpo, "--study-name", "bench_ray", *common],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
    for proc in procs:
        assert proc.wait(timeout=900) == 0, f"{side} worker failed"
    total = time.time() - launched
    trials = optuna.load_study(study_name="bench_ray", storage=url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    first = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
    last = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    return {"total": total, "to_first_trial": first - launched, "trials": last - first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("HPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    admin = sqlalchemy.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "bench.yaml"
        study_file.write_text(STUDY.format(sleep=args.sleep, trials=args.trials, epochs=args.epochs))
        for _ in range(args.rounds):
            for side in ("baseline", "ray"):
                url, name = fresh_db(admin, args.postgres)
                try:
                    results[side].append(run_side(side, study_file, url, Path(tmp)))
                finally:
                    with admin.connect() as conn:
                        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    ideal = args.trials * args.epochs * args.sleep / 2
    print(
        f"{args.trials} trials x {args.epochs} epochs x {args.sleep}s, 2 at a time (ideal {ideal:.1f}s); "
        f"median of {args.rounds} round(s), seconds"
    )
    medians = {
        side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()
    }
    for side, m in medians.items():
        print(
            f"  {side:8s} total {m['total']:6.1f} | until first trial {m['to_first_trial']:5.1f} | "
            f"trials {m['trials']:6.1f}"
        )
    b, r = medians["baseline"], medians["ray"]
    print(
        f"  ratio ray/baseline: total {r['total'] / b['total']:.2f}x, trials {r['trials'] / b['trials']:.2f}x"
    )


if __name__ == "__main__":
    main()
