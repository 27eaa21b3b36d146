"""Runs that survive: a real run killed with SIGKILL mid-way and resumed ends exactly like an uninterrupted
one, and the same seed gives the same results bit for bit (CPU), in another process too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffcircuit.cli import main

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
    "--quiet",
]


def _run_args(small_model_dir, out: Path) -> list[str]:
    return ["run", "--out", str(out), "--model", str(small_model_dir), *ARGS]


@pytest.fixture(scope="module")
def reference(small_model_dir_module, tmp_path_factory, run_outputs):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_run_args(small_model_dir_module, out)) == 0
    return run_outputs(out)


def _kill_when(cmd: list[str], shards: Path, first: str) -> list[str]:
    """Start ``cmd``, SIGKILL it as soon as the shard file ``first`` exists; return the shard files then.

    A shard is done when all its parts exist; ``cost.json`` is written last, so waiting for it kills
    the run just after a whole shard (a kill between two parts leaves the shard to be recomputed)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )  # same env: same thread count
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None and not (shards / first).exists():
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        return sorted(p.name for p in shards.glob("*"))
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "first", ["observe_s3_a_t800_0-3.cost.json", "ablate_b_t20.cost.json"]
)  # mid-observation, mid-interventions: killed just after these shards' last parts
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(
    small_model_dir_module, tmp_path, reference, first, run_outputs, assert_same_outputs
):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffcircuit.cli", *_run_args(small_model_dir_module, out)]
    written = _kill_when(cmd, out / "shards", first)
    assert first in written and not (out / "summary.json").exists()
    assert main(_run_args(small_model_dir_module, out)) == 0  # the same command resumes
    log = (out / "run.log").read_text()
    assert "resumed from disk" in log and f"shard {first.split('.')[0]}: resumed from disk" in log
    assert not list(out.glob("**/*.tmp"))  # temporary files of the killed writes are cleared
    assert_same_outputs(reference, run_outputs(out))


def test_the_same_seed_gives_the_same_results_bit_for_bit_in_another_process(
    small_model_dir_module, tmp_path, reference, run_outputs, assert_same_outputs
):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffcircuit.cli", *_run_args(small_model_dir_module, out)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert_same_outputs(reference, run_outputs(out))
    # and a finished run re-run with the same command recomputes nothing
    assert main(_run_args(small_model_dir_module, out)) == 0
    assert "0 shards computed" in (out / "run.log").read_text().splitlines()[-1]
