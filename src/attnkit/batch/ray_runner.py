"""The batch runner on Ray: the same jobs, files and result lines, through Ray Data.

    summary = run_batch_ray("jobs.jsonl", "out", model="tiny", address=None, actors=2)

The pending jobs become a Ray Dataset; ``map_batches`` sends them, ``batch_size`` at a time, to a pool of
``actors`` actors (:class:`JobActor`), each of which loads the pipeline once and runs its jobs with the same
:class:`~attnkit.batch.runner.JobRunner` as one process does, writing ``OUT/<id>/`` itself (so ``OUT`` must be a
folder every node sees). The driver streams the result lines into results.jsonl / errors.jsonl with a progress
bar. Ray restarts an actor that dies and retries its batch; jobs the dead actor had already finished are found
in place and not run again, so every job is done exactly once. ``pip install -e ".[ray]"``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from attnkit.batch.jobs import Job, read_jobs
from attnkit.batch.runner import (
    ERRORS,
    RESULTS,
    JobRunner,
    Summary,
    _progress,
    append_line,
    clean_staging,
    finished,
    read_lines,
    rebuild,
)
from attnkit.engine import AttnkitError
from attnkit.runs import RunContext, parse_request


class JobActor:
    """A Ray Data actor: one pipeline, loaded once; each call runs a batch of jobs given as JSON lines."""

    def __init__(self, out: str, model: str | None, device: str, dtype: str, batch_size: int, cwd: str,
                 threads: int | None = None) -> None:
        from attnkit.runs import load_model, resolve_device

        os.chdir(cwd)  # relative image paths in the jobs mean what they mean to the driver
        if threads:
            import torch

            torch.set_num_threads(threads)
        device = resolve_device(device)
        self.runner = JobRunner(load_model(model, device, dtype), Path(out),
                                RunContext(model=model, device=device, dtype=dtype), batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        # Jobs travel as their JSON lines (validated on the driver; parsing again here is cheap and keeps
        # what crosses the cluster plain JSON rather than pickled objects).
        jobs = []
        for text, number in zip(batch["job"], batch["line"], strict=True):
            raw = json.loads(str(text))
            jobs.append(Job(raw["id"], int(number), parse_request(raw, where=f"line {number}"), raw))
        lines = [{**line, "actor_pid": os.getpid()} for line in self.runner.run(jobs)]
        return {"result": np.array([json.dumps(line) for line in lines], dtype=object)}


def run_batch_ray(jobs_file: str | Path, out: str | Path, model: str | None = None, device: str = "auto",
                  dtype: str = "float32", batch_size: int = 8, address: str | None = None, actors: int = 1,
                  num_gpus: float = 0.0, threads: int | None = None, progress: bool = True,
                  echo: Any = None) -> Summary:
    """Run every job of ``jobs_file`` on Ray (``address``: a cluster, ``"auto"``, or None for a local
    instance) with ``actors`` actors of ``num_gpus`` GPUs each. Same files and lines as :func:`run_batch`."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise AttnkitError("--ray needs Ray Data: pip install -e \".[ray]\"") from None
    started = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise AttnkitError(f"--out {out} is a file: pass a folder")
    jobs, failures = read_jobs(jobs_file)
    out.mkdir(parents=True, exist_ok=True)
    clean_staging(out)
    done = {j.id for j in jobs if finished(out, j.id)}
    pending = [j for j in jobs if j.id not in done]
    for failure in failures:
        append_line(out / ERRORS, failure.record())
    summary = Summary(skipped=len(done), total=len(jobs) + len(failures))
    if pending:
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            _wait_for_cpus(ray)
        try:
            _stream(ray, pending, out, model, device, dtype, batch_size, actors, num_gpus, threads, progress, summary)
        finally:
            if owns_ray:
                ray.shutdown()
    n_results, _ = rebuild(out, jobs, failures)
    summary.ok = n_results - len(done)
    summary.failed_ids = [str(e.get("id")) for e in read_lines(out / ERRORS)]
    summary.errors = len(summary.failed_ids)
    summary.seconds = round(time.perf_counter() - started, 3)
    if echo is not None:
        echo(f"{summary.ok} ok, {summary.errors} failed, {summary.skipped} already done (Ray, {actors} actors); "
             f"{out / RESULTS}" + (f", errors in {out / ERRORS}" if summary.errors else ""))
    return summary


def _wait_for_cpus(ray: Any, timeout: float = 120.0) -> None:
    """Wait until the cluster reports its CPUs (a fresh local node takes a while on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not ray.cluster_resources().get("CPU"):
        if time.monotonic() > deadline:
            raise AttnkitError("the Ray cluster reports no CPUs: check `ray status` (or the --ray-address)")
        time.sleep(0.2)


def _stream(ray: Any, pending: list[Job], out: Path, model: str | None, device: str, dtype: str, batch_size: int,
            actors: int, num_gpus: float, threads: int | None, progress: bool, summary: Summary) -> None:
    items = [{"job": json.dumps(j.raw), "line": j.line} for j in pending]
    blocks = max(1, min(len(items), -(-len(items) // max(1, batch_size))))
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the runner's own bar counts jobs, Ray's would count blocks
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    gpus = {"num_gpus": num_gpus} if num_gpus else {}
    with warnings.catch_warnings():
        # `concurrency=` is what every Ray Data >= 2.9 takes (2.51 prefers `compute=`, and warns). Ray Data's actor
        # pools restart a dead actor and retry its task by default (max_restarts / max_task_retries = -1).
        warnings.simplefilter("ignore")
        results = dataset.map_batches(
            JobActor, batch_size=max(1, batch_size), concurrency=max(1, actors), batch_format="numpy",
            fn_constructor_kwargs=dict(out=str(out), model=model, device=device, dtype=dtype,
                                       batch_size=batch_size, cwd=os.getcwd(), threads=threads),
            **gpus,
        )
    bar = _progress(len(pending), progress, f"batch (ray, {actors} actors)")
    seen: set[str] = set()
    try:
        for row in results.iter_rows():
            line = json.loads(row["result"])
            if line["id"] in seen:  # a retried batch reports a job again: count it once
                continue
            seen.add(line["id"])
            ok = line["status"] == "ok"
            append_line(out / (RESULTS if ok else ERRORS), line)
            summary.ok += ok
            summary.errors += not ok
            bar.update(1)
            bar.set_postfix(ok=summary.ok, errors=summary.errors, refresh=False)
    finally:
        bar.close()
