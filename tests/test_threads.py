"""Threads per worker slot (issue 14): a trainer gets its share of the cores, not all of them,
and its process sees the same count in OMP_NUM_THREADS/MKL_NUM_THREADS, so K trainers on one
machine do not oversubscribe it (an oversubscribed OpenMP pool spins: 70 s against 7.6 s per
digits trial on a loaded machine)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import cli_env

from hpo._records import trial_metrics
from hpo.cli import _child_args, build_parser
from hpo.launcher import available_cores, threads_per_slot
from hpo.policy import ObjectivePolicy

HPO = Path(sys.executable).parent / "hpo"

MODEL = """
import ctypes
import os

import torch

from hpo.objective import Objective


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost",
    )]


def big_block_mmapped():
    # Whether glibc serves a 20 MB allocation with its own mmap (returned to the system when
    # freed, faulted back in when allocated again) rather than from the heap.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(20 * 1024 * 1024)
    mapped = libc.mallinfo2().hblkhd - before >= 20 * 1024 * 1024
    libc.free(block)
    return float(mapped)


def train(run):
    # What the trainer process was given, reported as metrics of its single epoch.
    run.report(1, {
        "loss": float(run.config["x"]) ** 2,
        "torch_threads": float(torch.get_num_threads()),
        "omp": float(os.environ.get("OMP_NUM_THREADS", "0")),
        "mkl": float(os.environ.get("MKL_NUM_THREADS", "0")),
        "big_block_mmapped": big_block_mmapped(),
    })
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss", "torch_threads", "omp", "mkl", "big_block_mmapped"))
"""

STUDY = """name: threads
objective: threadprobe:OBJECTIVE
search_space:
  x: {type: float, low: -1, high: 1}
metric: loss
direction: minimize
n_trials: 1
budget: {max_epochs: 1}
sampler: {name: random, seed: 1}
"""


def test_threads_per_slot_shares_the_cores() -> None:
    assert threads_per_slot(1, cores=8) == 8
    assert threads_per_slot(4, cores=8) == 2
    assert threads_per_slot(3, cores=8) == 2
    assert threads_per_slot(16, cores=8) == 1  # never zero
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def _run_worker(tmp_path: Path, *flags: str, env_extra: dict[str, str] | None = None) -> dict[str, float]:
    (tmp_path / "threadprobe.py").write_text(MODEL)
    study_file = tmp_path / "threads.yaml"
    study_file.write_text(STUDY)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = cli_env()
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    env.update(env_extra or {})
    result = subprocess.run(
        [str(HPO), "worker", str(study_file), "--storage", url, "--no-progress", *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (trial,) = optuna.load_study(study_name="threads", storage=url).trials
    return {k: v[-1] for k, v in trial_metrics(trial).items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_trainer_process_runs_with_the_threads_asked_for(tmp_path: Path, threads: int) -> None:
    metrics = _run_worker(tmp_path, "--threads", str(threads))
    assert (metrics["torch_threads"], metrics["omp"], metrics["mkl"]) == (threads, threads, threads)


def test_by_default_a_cpu_worker_takes_the_cores_it_may_use(tmp_path: Path) -> None:
    metrics = _run_worker(tmp_path)
    cores = available_cores()
    assert (metrics["torch_threads"], metrics["omp"]) == (cores, cores)


def test_an_exported_omp_num_threads_is_the_default(tmp_path: Path) -> None:
    metrics = _run_worker(tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert (metrics["torch_threads"], metrics["omp"]) == (1, 1)


def test_gpu_slot_children_get_their_share(tmp_path: Path) -> None:
    """``--gpus``/``--trials-per-gpu`` children are started with the parent's per-slot count."""
    args: argparse.Namespace = build_parser().parse_args(["worker", "study.yaml", "--threads", "3"])
    child = _child_args(args, "s", ObjectivePolicy.from_sources(cli_patterns=[], trusted=()))
    assert child[child.index("--threads") + 1] == "3"


def test_the_trainer_keeps_large_blocks_on_its_heap_unless_the_user_set_malloc(tmp_path: Path) -> None:
    # hpo.trainer.tune_malloc: a training step's tens of megabytes of gradients and activations
    # are reused from the heap, not unmapped when freed and faulted back in at every step
    assert _run_worker(tmp_path, "--threads", "1")["big_block_mmapped"] == 0.0
    # glibc's own default (128 KiB, exported by the user) is theirs to keep
    user = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    (tmp_path / "user").mkdir()
    assert _run_worker(tmp_path / "user", "--threads", "1", env_extra=user)["big_block_mmapped"] == 1.0
