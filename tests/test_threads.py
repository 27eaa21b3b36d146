"""CPU threads (``diffcircuit._threads``): passive waiting unless the environment says otherwise, and a thread
count set inside ``threads_restored`` is undone on the way out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffcircuit._threads import prefer_passive_wait, set_threads, threads_restored


def test_passive_waiting_is_asked_for_unless_the_environment_already_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prefer_passive_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_passive_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


_WATCH_TORCH = """
import builtins, os
seen = []
real_import = builtins.__import__

def watching(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real_import(name, *args, **kwargs)

builtins.__import__ = watching
import diffcircuit
print(seen[0])
"""


def test_importing_diffcircuit_sets_the_policy_before_it_imports_torch():
    """libgomp reads the variable when torch is first imported: it must be set by then."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", _WATCH_TORCH], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["PASSIVE"]


@pytest.mark.parametrize("threads", [None, 0])
def test_no_thread_count_leaves_torchs_own(threads):
    before = torch.get_num_threads()
    set_threads(threads)
    assert torch.get_num_threads() == before


def test_a_count_set_inside_is_restored_on_the_way_out_even_after_an_error():
    before = torch.get_num_threads()
    other = 2 if before != 2 else 1
    with threads_restored():
        set_threads(other)
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads_restored():
        set_threads(str(other))  # a count given as text, as a config may hold it
        assert torch.get_num_threads() == other
        raise RuntimeError("a failing command")
    assert torch.get_num_threads() == before
