"""The batch runner on a local Ray instance with two actors on the bundled model: one actor is killed
mid-batch, Ray restarts it and retries its jobs, and the run ends with every job done exactly once and the same
images as one process makes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
from PIL import Image

from attnkit.batch.runner import RESULTS, run_batch

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a grey background", "a yellow diamond on a white background"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def ray_actor_processes():
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("MapWorker" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_ray_actors_survive_a_kill_and_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the actors inherit it: one thread each on a 2-core machine
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    jobs = [{"id": f"j{i}", "method": "generate", "prompt": PROMPTS[i % 4], "seed": i, "steps": 25}
            for i in range(8)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "ray"
    killed = []

    def kill_one_actor_once_work_is_under_way():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            done = [p for p in out.glob("j*") if (p / "record.json").is_file()] if out.is_dir() else []
            actors = ray_actor_processes()
            if done and len(actors) >= 2:
                victim = actors[0]
                killed.append(victim.pid)
                victim.kill()  # SIGKILL: no chance to clean up
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_once_work_is_under_way, daemon=True)
    killer.start()
    # The CLI in a subprocess, so a stuck cluster ends in a timeout here, not in a hung test run.
    # Its own process group: on a timeout the whole local Ray instance goes with it.
    process = subprocess.Popen([sys.executable, "-m", "attnkit", "batch", str(path), "--out", str(out), "--ray",
                                "--actors", "2", "--batch-size", "1", "--threads", "1", "--device", "cpu",
                                "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    killer.join(timeout=5)
    assert process.returncode == 0, stderr[-3000:]
    assert killed, "no actor was killed: the test proved nothing"
    results = [json.loads(t) for t in (out / RESULTS).read_text().splitlines()]
    assert [r["id"] for r in results] == [j["id"] for j in jobs]  # every job exactly once, in file order
    pids = {r["actor_pid"] for r in results}
    assert len(pids) >= 3 or killed[0] not in pids  # a restarted actor took over the dead one's jobs
    assert not list(out.glob(".staging-*"))
    single = tmp_path / "single"
    run_batch(path, single, device="cpu", batch_size=1, progress=False)
    for job in jobs:
        assert np.array_equal(pixels(out / job["id"] / "image.png"), pixels(single / job["id"] / "image.png"))


def test_the_actor_runs_its_batch_and_a_retried_batch_does_not_redo_finished_jobs(tmp_path):
    from attnkit.batch.ray_runner import JobActor

    actor = JobActor(out=str(tmp_path), model="tiny", device="cpu", dtype="float32", batch_size=2,
                     cwd=str(tmp_path), threads=1)
    jobs = [{"id": f"a{i}", "method": "generate", "prompt": "a red circle", "seed": i, "steps": 2} for i in range(3)]
    batch = {"job": np.array([json.dumps(j) for j in jobs], dtype=object), "line": np.array([1, 2, 3])}
    first = [json.loads(line) for line in actor(batch)["result"]]
    assert [(r["id"], r["status"], r["line"]) for r in first] == [("a0", "ok", 1), ("a1", "ok", 2), ("a2", "ok", 3)]
    stamps = [(tmp_path / j["id"] / "record.json").stat().st_mtime_ns for j in jobs]
    again = [json.loads(line) for line in actor(batch)["result"]]  # what a retry after an actor's death sends
    assert [r["status"] for r in again] == ["ok"] * 3
    assert stamps == [(tmp_path / j["id"] / "record.json").stat().st_mtime_ns for j in jobs]
