"""The Ray backend: the same config gives the same tables and summary as the local backend, bit for bit,
and a Ray worker killed with SIGKILL mid-run costs time, not results (the actor restarts, the task is retried)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from diffcircuit.cli import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

ARGS = [
    "--n",
    "3",
    "--timesteps",
    "20,800",
    "--batch-size",
    "2",
    "--seed",
    "3",
    "--ablate-n",
    "2",
    "--shard-images",
    "1",
    "--threads",
    "1",
    "--quiet",
]  # one thread everywhere: CPU sums are bit-identical only at equal thread counts
_DEPLOYMENT = (
    "backend",
    "workers",
    "ray_address",
)  # where shards were computed: not part of the results


def _comparable(outputs: dict) -> dict:
    """The outputs with the deployment settings dropped from the recorded configs."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _DEPLOYMENT}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return {
        name: value if hasattr(value, "columns") else strip(value)
        for name, value in outputs.items()
    }


@pytest.fixture(scope="module")
def local_reference(small_model_dir_module, tmp_path_factory, run_outputs):
    out = tmp_path_factory.mktemp("local") / "run"
    assert main(["run", "--out", str(out), "--model", str(small_model_dir_module), *ARGS]) == 0
    return _comparable(run_outputs(out))


@pytest.mark.slow
def test_ray_backend_with_three_workers_gives_the_local_results_bit_for_bit(
    small_model_dir_module, tmp_path, local_reference, run_outputs, assert_same_outputs
):
    out = tmp_path / "run"
    args = [
        "run",
        "--out",
        str(out),
        "--model",
        str(small_model_dir_module),
        *ARGS,
        "--backend",
        "ray",
        "--workers",
        "3",
    ]
    assert (
        main(args) == 0
    )  # on a 2-core machine, 3 workers share the CPUs instead of one waiting forever
    log = (out / "run.log").read_text()
    assert (
        log.count("(ray worker)") >= 20 and "ray worker 2: pid" in log
    )  # shards really were computed by workers
    assert_same_outputs(local_reference, _comparable(run_outputs(out)))
    assert not ray.is_initialized()  # the local instance it started was shut down


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_is_restarted_and_the_results_do_not_change(
    small_model_dir_module, tmp_path, local_reference, run_outputs, assert_same_outputs
):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "diffcircuit.cli",
        "run",
        "--out",
        str(out),
        "--model",
        str(small_model_dir_module),
        *ARGS,
        "--backend",
        "ray",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, victim, deadline = out / "run.log", None, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text() if log.exists() else ""
            pids = re.findall(r"ray worker \d+: pid (\d+)", text)
            if (
                len(pids) == 2 and "(ray worker)" in text
            ):  # both workers up and at least one shard done
                victim = int(pids[0])
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert victim is not None, "the run ended before a worker could be killed"
        assert not (out / "summary.json").exists()  # killed mid-run, not after it
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # that worker is gone: its tasks were retried by a restarted actor
    assert_same_outputs(local_reference, _comparable(run_outputs(out)))


def test_the_ray_backend_reports_an_unreachable_cluster_in_one_line(
    small_model_dir_module, tmp_path, capsys
):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--out",
            str(out),
            "--model",
            str(small_model_dir_module),
            *ARGS,
            "--backend",
            "ray",
            "--address",
            "127.0.0.1:1",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "Ray" in err and "Traceback" not in err
    assert not (out / "tables").exists()
