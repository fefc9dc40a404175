"""Throughput of `attnkit batch` on the bundled model: one process job by job, one process batched, two Ray
actors; and a run of >= 100 jobs killed with SIGKILL and resumed, counting lost and duplicated jobs.

    python benchmarks/batch.py            # 64 jobs at the model's 25 steps, 120 jobs in the kill test
    python benchmarks/batch.py --quick    # 24 jobs at 10 steps, 100 jobs at 2 steps (under 5 minutes)

Every mode runs the same job file in a fresh folder, through the CLI in a subprocess (what a user runs), with
one torch thread per process; jobs/min counts jobs over the whole command, model loading included. Prints a
markdown table, then one JSON line: jobs_per_min_single, jobs_per_min_batched, jobs_per_min_ray2, lost,
duplicated (and the max pixel difference between batched and job-by-job images).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green", "yellow", "purple")
           for s in ("circle", "square", "triangle", "diamond") for b in ("white", "black", "grey")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def write_jobs(path: Path, n: int, steps: int | None) -> list[str]:
    ids = []
    with open(path, "w") as handle:
        for i in range(n):
            job = {"id": f"job{i:04d}", "method": "generate", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
            if steps:
                job["steps"] = steps
            handle.write(json.dumps(job) + "\n")
            ids.append(job["id"])
    return ids


def command(jobs: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    line = [sys.executable, "-m", "attnkit", "batch", str(jobs), "--out", str(out), "--threads", "1", "--quiet",
            "--device", args.device, "--dtype", args.dtype, *extra]
    return line + (["--model", args.model] if args.model else [])


def timed(cmd: list[str], timeout: float) -> float | None:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return time.perf_counter() - start


def kill_and_resume(root: Path, args: argparse.Namespace) -> dict:
    jobs = root / "kill.jsonl"
    ids = write_jobs(jobs, args.kill_jobs, args.kill_steps)
    out = root / "kill"
    process = subprocess.Popen(command(jobs, out, args, "--batch-size", "4"), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    target = len(ids) // 3
    while process.poll() is None:
        done = [p for p in out.glob("job*") if (p / "record.json").is_file()] if out.is_dir() else []
        if len(done) >= target:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p.name: (p / "record.json").stat().st_mtime_ns for p in out.glob("job*")
              if (p / "record.json").is_file()}
    half_written = [p.name for p in out.glob("job*") if not (p / "record.json").is_file()]
    subprocess.run(command(jobs, out, args, "--batch-size", "4"), env=ENV, capture_output=True, timeout=3600)
    results = [json.loads(t)["id"] for t in (out / "results.jsonl").read_text().splitlines()]
    after = {p.name: (p / "record.json").stat().st_mtime_ns for p in out.glob("job*")}
    redone = [j for j, stamp in before.items() if after.get(j) != stamp]
    return {"jobs": len(ids), "done_before_kill": len(before), "half_written_folders": len(half_written),
            "lost": len(set(ids) - set(results)), "duplicated": len(results) - len(set(results)) + len(redone)}


def max_pixel_diff(a: Path, b: Path, ids: list[str]) -> int:
    worst = 0
    for job in ids:
        with Image.open(a / job / "image.png") as x, Image.open(b / job / "image.png") as y:
            worst = max(worst, int(np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    args.jobs = args.jobs or (24 if args.quick else 64)
    args.steps = args.steps or (10 if args.quick else None)
    args.kill_jobs, args.kill_steps = (100, 2) if args.quick else (120, None)
    root = Path(tempfile.mkdtemp(prefix="attnkit-batch-bench-"))
    jobs = root / "jobs.jsonl"
    ids = write_jobs(jobs, args.jobs, args.steps)
    rows = {}
    rows["one process, job by job"] = timed(command(jobs, root / "single", args, "--batch-size", "1"), 3600)
    rows[f"one process, batches of {args.batch_size}"] = timed(
        command(jobs, root / "batched", args, "--batch-size", str(args.batch_size)), 3600)
    if not args.skip_ray:
        rows["Ray, 2 actors, job by job"] = timed(
            command(jobs, root / "ray", args, "--batch-size", "1", "--ray", "--actors", "2"), 1800)
    single = rows["one process, job by job"]
    print(f"{args.jobs} generate jobs on {args.model or 'the bundled model'}, {args.steps or 'the model own'} steps, "
          f"device {args.device}, one torch thread per process\n")
    print("| mode | seconds | jobs / min | vs job by job |\n|---|---|---|---|")
    per_min = {}
    for name, seconds in rows.items():
        per_min[name] = None if seconds is None else args.jobs / seconds * 60
        ratio = "" if seconds is None or single is None else f"{single / seconds:.2f}x"
        print(f"| {name} | {'failed' if seconds is None else f'{seconds:.1f}'} | "
              f"{'' if seconds is None else f'{per_min[name]:.1f}'} | {ratio} |")
    diff = max_pixel_diff(root / "single", root / "batched", ids) if all(rows[k] for k in list(rows)[:2]) else None
    kill = kill_and_resume(root, args)
    print(f"\nbatched vs job by job: max pixel difference {diff} (of 255)")
    print(f"killed after {kill['done_before_kill']} of {kill['jobs']} jobs (SIGKILL), resumed: lost {kill['lost']}, "
          f"duplicated {kill['duplicated']}, half-written folders {kill['half_written_folders']}")
    names = list(rows)
    print(json.dumps({
        "jobs_per_min_single": per_min[names[0]] and round(per_min[names[0]], 2),
        "jobs_per_min_batched": per_min[names[1]] and round(per_min[names[1]], 2),
        "jobs_per_min_ray2": (per_min[names[2]] and round(per_min[names[2]], 2)) if len(names) > 2 else None,
        "lost": kill["lost"], "duplicated": kill["duplicated"], "max_pixel_diff_batched": diff,
        "jobs": args.jobs, "kill_jobs": kill["jobs"],
    }))


if __name__ == "__main__":
    main()
