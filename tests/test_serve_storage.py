"""``hpo serve-storage``: hpo workers through Optuna's gRPC storage proxy on real PostgreSQL record every
trial exactly once, keep their trials alive with heartbeats through it, and a dead worker's trial is
re-queued by the proxy; bad URLs and occupied ports are one clear line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from background import Output, free_port, stop
from conftest import cli_env, run_cli, start_cli
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo._rdb import WORKER_ATTR


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Background processes of one test, stopped at its end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        stop(proc)


def start_proxy(procs: list[subprocess.Popen[str]], storage: str, *args: str) -> tuple[Output, str]:
    proc = start_cli(["serve-storage", "--storage", storage, "--port", str(free_port()), *args])
    procs.append(proc)
    out = Output(proc)
    return out, out.wait_for(r"on (grpc://127\.0\.0\.1:\d+);").group(1)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_through_the_proxy_record_every_trial_exactly_once(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    n_trials = 12
    _, proxy = start_proxy(procs, postgres_url)
    study_file = quadratic_study(tmp_path, name="fleet", n_trials=n_trials, epochs=3, sleep=0.3)
    created = run_cli(["create-study", str(study_file), "--storage", proxy])
    assert created.returncode == 0, created.stderr
    assert f"created in {proxy}" in created.stdout

    workers = [
        Output(start_cli(["worker", "--study-name", "fleet", "--storage", proxy, "--no-progress"]))
        for _ in range(3)
    ]
    procs.extend(w.proc for w in workers)

    # A second proxy on the same port must fail, not share the port (gRPC's SO_REUSEPORT).
    port = proxy.rsplit(":", 1)[1]
    second = run_cli(["serve-storage", "--storage", postgres_url, "--port", port], timeout=60)
    assert one_error_line(second).startswith(f"error: port {port} on 127.0.0.1 is in use")

    for worker in workers:
        assert worker.finish(timeout=240) == 0, worker.text
    # Each trial was run by exactly one worker, and nothing beyond the study's budget was run.
    reported = Counter(
        int(m.group(1)) for w in workers for m in re.finditer(r"^trial (\d+) COMPLETE", w.text, re.M)
    )
    assert reported == Counter(range(n_trials)), "\n".join(w.text for w in workers)
    study = optuna.load_study(study_name="fleet", storage=postgres_url)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(n_trials))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == n_trials
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials)
    assert len({t.system_attrs[WORKER_ATTR] for t in trials}) >= 2, "the workers did not share the study"
    # Heartbeats go to the database's heartbeat table, never into the trials' attributes.
    assert not any("hpo:heartbeat" in t.system_attrs for t in trials)


@pytest.mark.slow
@pytest.mark.postgres
def test_heartbeats_through_the_proxy_keep_live_trials_and_requeue_a_dead_workers_trial(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    _, proxy = start_proxy(procs, postgres_url, "--heartbeat-interval", "1", "--grace-period", "3")
    # Each trial takes 4 s, longer than the 3 s grace period: only heartbeats keep it alive.
    study_file = quadratic_study(
        tmp_path,
        name="beats",
        n_trials=2,
        epochs=8,
        sleep=0.5,
        objective="hpo_test_objectives:marker_then_sleep",
    )
    assert run_cli(["create-study", str(study_file), "--storage", proxy]).returncode == 0
    markers = tmp_path / "markers"
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    args = ["worker", "--study-name", "beats", "--storage", proxy, "--no-progress"]
    args += ["--heartbeat-interval", "1", "--grace-period", "3"]

    # The first worker dies (SIGKILL: no chance to re-queue) as soon as it has started trial 0.
    doomed = start_cli(args, env=env)
    procs.append(doomed)
    _wait_for_marker(markers / "trial-0.started", doomed.pid, Output(doomed))
    os.kill(doomed.pid, signal.SIGKILL)
    # The second one runs trial 1, then the retry of trial 0 that the proxy queues after 3 s.
    survivor = start_cli(args, env=env)
    procs.append(survivor)
    survivor_out = Output(survivor)

    assert survivor_out.finish(timeout=120) == 0, survivor_out.text
    study = optuna.load_study(study_name="beats", storage=postgres_url)
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[0].state == TrialState.FAIL  # the killed worker's trial, failed by the proxy
    assert by_number[1].state == TrialState.COMPLETE  # alive for 4 s on heartbeats alone
    retry = by_number[2]
    assert retry.state == TrialState.COMPLETE
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == by_number[0].params
    assert len(by_number) == 3
    assert "trial 2 COMPLETE" in survivor_out.text


def _wait_for_marker(path: Path, pid: int, out: Output) -> None:
    """Wait until the worker ``pid`` has started the trial whose marker is ``path``."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == str(pid):
            return
        if out.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written by worker {pid}; its output:\n{out.text}")


def test_an_occupied_port_is_one_clear_line(sqlite_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["serve-storage", "--storage", sqlite_url, "--port", str(port)], timeout=60)
    assert one_error_line(result).startswith(f"error: port {port} on 127.0.0.1 is in use (fix: --port N")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://localhost/db", "unsupported database 'mongodb'"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", "cannot open storage"),
        ("grpc://127.0.0.1:13000", "serves a database, not another proxy"),
    ],
)
def test_a_bad_storage_url_is_one_clear_line(url: str, expected: str) -> None:
    result = run_cli(["serve-storage", "--storage", url, "--port", str(free_port())], timeout=60)
    line = one_error_line(result)
    assert expected in line and "fix:" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("grpc://127.0.0.1", "expected grpc://HOST:PORT"),
        ("grpc://127.0.0.1:{port}", "cannot reach the storage proxy at grpc://127.0.0.1:{port}"),
    ],
)
def test_a_worker_given_a_bad_proxy_address_says_so_in_one_line(url: str, expected: str) -> None:
    port = free_port()
    result = run_cli(["worker", "--study-name", "any", "--storage", url.format(port=port)], timeout=90)
    line = one_error_line(result)
    assert expected.format(port=port) in line and "fix:" in line


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_wait_out_a_restart_of_the_proxy(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    n_trials = 10
    port = free_port()
    args = ["serve-storage", "--storage", postgres_url, "--port", str(port)]
    proxy = start_cli(args)
    procs.append(proxy)
    Output(proxy).wait_for(r"on grpc://127\.0\.0\.1:\d+;")
    url = f"grpc://127.0.0.1:{port}"
    study_file = quadratic_study(tmp_path, name="fleet", n_trials=n_trials, epochs=4, sleep=0.4)
    assert run_cli(["create-study", str(study_file), "--storage", postgres_url]).returncode == 0
    worker_args = ["worker", "--study-name", "fleet", "--storage", url, "--no-progress"]
    workers = [start_cli([*worker_args, "--storage-patience", "120"]) for _ in range(2)]
    procs.extend(workers)
    outputs = [Output(w) for w in workers]
    outputs[0].wait_for(r"trial \d+ COMPLETE", timeout=180)
    proxy.kill()  # the proxy dies mid-study ...
    proxy.wait(timeout=30)
    time.sleep(5)
    again = start_cli(args)  # ... and comes back on the same port
    procs.append(again)
    Output(again).wait_for(r"on grpc://127\.0\.0\.1:\d+;", timeout=60)
    codes = [out.finish(timeout=300) for out in outputs]
    assert codes == [0, 0], "\n----\n".join(out.text for out in outputs)
    text = "\n".join(out.text for out in outputs)
    assert "unreachable" in text and "reachable again" in text, text
    trials = optuna.load_study(study_name="fleet", storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials and not [t for t in trials if t.state == TrialState.RUNNING]
