"""The batch runner: nothing lost, nothing done twice, every failure recorded; batching changes nothing;
kills and reruns; accelerate with two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnkit.batch.runner import ERRORS, RESULTS, run_batch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jobs(path, jobs):
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def lines(path):
    return [json.loads(t) for t in Path(path).read_text().splitlines()]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def job_folders(out):
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def generate_jobs(n, steps=2):
    return [{"id": f"g{i:03d}", "method": "generate", "prompt": ["a red circle", "a blue square", "a cat"][i % 3],
             "seed": i, "steps": steps} for i in range(n)]


def test_every_job_runs_once_and_every_failure_is_recorded(tmp_path):
    (tmp_path / "not-an-image.png").write_text("this is text")
    jobs = [
        *generate_jobs(3),
        {"id": "m1", "method": "maps", "prompt": "a red circle", "steps": 2, "words": ["red"]},
        {"id": "m2", "method": "maps", "prompt": "a blue square", "steps": 2, "seed": 4},
        {"id": "bad-field", "method": "generate", "prompt": "a cat", "colour": "red"},
        {"id": "bad-word", "method": "maps", "prompt": "a red circle", "words": ["zebra"], "steps": 2},
        {"id": "bad-image", "method": "invert", "image": str(tmp_path / "not-an-image.png"), "prompt": "a cat",
         "inversion": "ddim", "steps": 2},
        {"id": "e1", "method": "edit", "source": "a lemon cake", "targets": ["a lego cake"], "steps": 2},
    ]
    out = tmp_path / "out"
    summary = run_batch(write_jobs(tmp_path / "jobs.jsonl", jobs), out, model="tiny", device="cpu", progress=False)
    assert (summary.ok, summary.errors, summary.skipped) == (6, 3, 0)
    assert job_folders(out) == ["e1", "g000", "g001", "g002", "m1", "m2"]
    results = lines(out / RESULTS)
    assert [r["id"] for r in results] == ["g000", "g001", "g002", "m1", "m2", "e1"]  # job-file order
    assert all(r["status"] == "ok" and r["error"] is None and "total" in r["timings"] for r in results)
    for r in results:
        assert sorted(r["files"]) == sorted(str(p.relative_to(out / r["id"])) for p in (out / r["id"]).rglob("*")
                                            if p.is_file())
    errors = {e["id"]: e for e in lines(out / ERRORS)}
    assert {k: (e["stage"], e["line"]) for k, e in errors.items()} == {
        "bad-field": ("validate", 6), "bad-word": ("check", 7), "bad-image": ("run", 8)}
    assert "field 'colour'" in errors["bad-field"]["error"] and "zebra" in errors["bad-word"]["error"]
    assert "not an image" in errors["bad-image"]["error"]
    record = json.loads((out / "m1" / "record.json").read_text())
    assert record["request"] == {"method": "maps", "prompt": "a red circle", "steps": 2, "words": ["red"]}
    assert record["cli"].startswith("attnkit maps 'a red circle'") and record["model"] == "tiny"
    assert not list(out.glob(".staging-*"))


def test_batched_jobs_equal_jobs_run_alone(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [*generate_jobs(4, steps=3),
                                                {"id": "m", "method": "maps", "prompt": "a cat", "steps": 3}])
    run_batch(jobs, tmp_path / "alone", model="tiny", device="cpu", batch_size=1, progress=False)
    run_batch(jobs, tmp_path / "together", model="tiny", device="cpu", batch_size=4, progress=False)
    batched = {r["id"]: r["timings"].get("batch_size", 1) for r in lines(tmp_path / "together" / RESULTS)}
    assert batched == {"g000": 4, "g001": 4, "g002": 4, "g003": 4, "m": 1}
    for job in ["g000", "g001", "g002", "g003", "m"]:
        a, b = pixels(tmp_path / "alone" / job / "image.png"), pixels(tmp_path / "together" / job / "image.png")
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, job  # float32 rounding of a wider batch only
    assert not np.array_equal(pixels(tmp_path / "together" / "g000" / "image.png"),
                              pixels(tmp_path / "together" / "g001" / "image.png"))


def test_a_rerun_skips_finished_jobs_and_retries_failed_ones(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_text("not yet an image")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [*generate_jobs(2), {
        "id": "inv", "method": "invert", "image": str(photo), "prompt": "a red square", "inversion": "ddim",
        "steps": 2}])
    out = tmp_path / "out"
    first = run_batch(jobs, out, model="tiny", device="cpu", progress=False)
    assert (first.ok, first.errors) == (2, 1)
    stamps = {j: (out / j / "record.json").stat().st_mtime_ns for j in ("g000", "g001")}
    Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)  # the failed job's input is fixed
    with open(out / RESULTS, "a") as handle:
        handle.write('{"id": "torn')  # a line a kill cut off
    second = run_batch(jobs, out, model="tiny", device="cpu", progress=False)
    assert (second.ok, second.errors, second.skipped) == (1, 0, 2)
    assert stamps == {j: (out / j / "record.json").stat().st_mtime_ns for j in ("g000", "g001")}
    assert [r["id"] for r in lines(out / RESULTS)] == ["g000", "g001", "inv"]
    assert (out / ERRORS).read_text() == ""
    third = run_batch(jobs, out, model="tiny", device="cpu", progress=False)
    assert (third.ok, third.errors, third.skipped) == (0, 0, 3)


def start_batch(jobs, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "attnkit", "batch", str(jobs), "--out", str(out), "--model",
                             "tiny", "--device", "cpu", "--threads", "1", "--quiet", "--batch-size", "1", *extra],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_folders(process, out, count, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_dir() and len(job_folders(out)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} finished jobs in time: {process.poll()} {process.stderr.read()}")


def assert_every_job_done_once(out, ids):
    results = [r["id"] for r in lines(out / RESULTS)]
    assert results == ids  # each exactly once, in job-file order
    assert job_folders(out) == ids
    for job in ids:
        assert (out / job / "record.json").is_file() and (out / job / "image.png").is_file()
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_resumes_with_every_job_done_exactly_once(tmp_path, sig):
    jobs = generate_jobs(12, steps=20)
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    process = start_batch(path, out)
    wait_for_folders(process, out, 2)
    process.send_signal(sig)
    code = process.wait(timeout=60)
    before = job_folders(out)
    assert 2 <= len(before) < len(jobs), "the kill came too late to test anything"
    for job in before:  # a folder exists only complete
        assert (out / job / "record.json").is_file()
    if sig == signal.SIGTERM:
        assert code == 130 and "run the same command again to resume" in process.stderr.read()
        assert not list(out.glob(".staging-*"))  # the job in flight cleaned up after itself
    else:
        assert code == -signal.SIGKILL
    stamps = {j: (out / j / "record.json").stat().st_mtime_ns for j in before}
    summary = run_batch(path, out, model="tiny", device="cpu", batch_size=1, progress=False)
    assert summary.skipped == len(before) and summary.ok == len(jobs) - len(before) and summary.errors == 0
    assert stamps == {j: (out / j / "record.json").stat().st_mtime_ns for j in before}  # not redone
    assert_every_job_done_once(out, [j["id"] for j in jobs])


def test_accelerate_launch_splits_the_jobs_across_two_processes(tmp_path):
    jobs = generate_jobs(6, steps=2)
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    launcher = Path(sys.executable).with_name("accelerate")
    # On a machine without GPUs accelerate's --multi_gpu is its torchrun launcher; the runner asks accelerate
    # for a group of CPU processes then.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "attnkit",
               "batch", str(path), "--out", str(out), "--model", "tiny", "--device", "cpu", "--threads", "1",
               "--quiet", "--batch-size", "1"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_job_done_once(out, [j["id"] for j in jobs])
    by_process = {}
    for r in lines(out / RESULTS):
        by_process.setdefault(r["process"], []).append(r["id"])
    assert by_process == {0: ["g000", "g001", "g002"], 1: ["g003", "g004", "g005"]}  # contiguous halves
    assert not list(out.glob("*.rank*.jsonl"))  # merged by the main process
    single = tmp_path / "single"
    run_batch(path, single, model="tiny", device="cpu", batch_size=1, progress=False)
    for job in jobs:
        assert np.array_equal(pixels(out / job["id"] / "image.png"), pixels(single / job["id"] / "image.png"))
