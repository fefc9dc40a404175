"""CPU threads: attnkit picks a count that does not collapse beside busy neighbours, and steps aside when the
user chose one (ATTNKIT_THREADS, set_threads, OMP_NUM_THREADS, torch.set_num_threads)."""

import math
import subprocess
import sys
import time

import pytest
import torch

import attnkit
from attnkit import threads
from attnkit.testing import tiny_pipeline


@pytest.fixture
def fresh(monkeypatch):
    """The module as a new process sees it (torch at 2 threads, nothing chosen), torch put back after."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_choice", None)
    monkeypatch.setattr(threads, "_startup", None)
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "_measured_at", -math.inf)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    yield monkeypatch
    torch.set_num_threads(before)


def test_auto_leaves_the_busy_cores_to_their_owners(fresh):
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 1.0)  # a training job holds one of two cores
    assert threads.auto_threads() == 1
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 0.93)  # a neighbour at 93% still holds it
    assert threads.auto_threads() == 1
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 0.02)
    assert threads.auto_threads() == 2
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 5.0)  # more neighbours than cores: still one
    assert threads.auto_threads() == 1


def test_generate_and_load_apply_the_default(fresh):
    """Before: torch kept its 2 threads beside a busy core and sampling took 10-60x longer."""
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 1.0)
    pipe = attnkit.load_pipeline(tiny_pipeline("sd"))
    assert torch.get_num_threads() == 1
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 0.0)  # the neighbour is gone ...
    fresh.setattr(threads, "_measured_at", -math.inf)  # ... and the last look is old
    attnkit.generate(pipe, "a red circle", steps=1, progress=False)
    assert torch.get_num_threads() == 2
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 1.0)
    fresh.setattr(threads, "_measured_at", -math.inf)
    attnkit.generate(pipe, "a red circle", steps=1, progress=False)
    assert torch.get_num_threads() == 1


def test_what_the_user_chose_wins(fresh):
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 1.0)
    fresh.setenv(threads.ENV, "2")
    assert threads.apply_threads() == 2 and torch.get_num_threads() == 2
    fresh.delenv(threads.ENV)
    attnkit.set_threads(1)
    assert torch.get_num_threads() == 1
    attnkit.set_threads("torch")
    torch.set_num_threads(2)
    assert threads.apply_threads() == 2
    attnkit.set_threads(None)  # back to the rules: auto
    assert threads.apply_threads() == 1
    torch.set_num_threads(2)  # the user's own call after attnkit's: left alone
    assert threads.apply_threads() == 2
    fresh.setattr(threads, "_applied", None)
    fresh.setattr(threads, "_startup", None)
    fresh.setenv("OMP_NUM_THREADS", "2")
    assert threads.apply_threads() == 2
    with pytest.raises(attnkit.AttnkitError, match="positive number of threads"):
        attnkit.set_threads(0)
    fresh.setenv(threads.ENV, "many")
    with pytest.raises(attnkit.AttnkitError, match="ATTNKIT_THREADS many"):
        threads.apply_threads()


def test_a_count_set_before_attnkit_caps_the_automatic_choice(fresh):
    torch.set_num_threads(1)  # e.g. a conftest or a script before its first attnkit call
    fresh.setattr(threads, "busy_cores", lambda window=0.1: 0.0)
    assert threads.apply_threads() == 1


def test_busy_cores_sees_a_spinning_neighbour_and_not_this_process():
    if threads.busy_cores() is None:
        pytest.skip("no /proc/stat on this system: the load average is used instead")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.busy_cores(window=0.5) >= 0.7  # the spinner (plus whatever else runs here)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.0 <= threads.busy_cores() <= threads.usable_cores() + 0.5
