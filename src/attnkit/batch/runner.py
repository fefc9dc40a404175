"""The batch runner: every job of a job file run once, its files under ``OUT/<id>/``, one result line per job.

    summary = run_batch("jobs.jsonl", "out", model="tiny", batch_size=8)
    summary.ok, summary.errors, summary.skipped

Correctness first. A job's folder is staged beside ``OUT/<id>`` and renamed into place only when every file
(``record.json`` last) is written, so ``OUT/<id>/`` exists exactly for finished jobs: a rerun after a crash,
SIGKILL or Ctrl-C skips them and removes stale staging folders. ``results.jsonl`` / ``errors.jsonl`` get a line
as each job ends and are rebuilt from the folders when the run ends, in job-file order, one line per job.

Speed: pending jobs with the same :func:`attnkit.runs.batch_key` (same method, steps, guidance, size) run up to
``batch_size`` at a time in one pipeline call, each row from its own seed's noise, so each job's images are
those of running it alone (up to float rounding). A failing batch is rerun job by job, to blame the right one.

Many processes: under ``accelerate launch`` the pending jobs are split across processes with accelerate's
``PartialState.split_between_processes``; each process writes ``results.rank<N>.jsonl``, and the main process
merges them when all are done. One process (no launcher) runs everything itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.batch.jobs import Failure, Job, read_jobs
from attnkit.engine import AttnkitError
from attnkit.runs import RECORD, Output, RunContext, batch_key, check, execute, execute_batch, write_output
from attnkit.runs.execute import staged_folder

RESULTS, ERRORS = "results.jsonl", "errors.jsonl"
STAGING_PREFIX = ".staging-"


@dataclass
class Summary:
    """What a batch run did: jobs run ok now, failed, skipped (finished before), and seconds."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    total: int = 0
    seconds: float = 0.0
    failed_ids: list[str] = field(default_factory=list)


# -- the state on disk --------------------------------------------------------------------------------------
def finished(out: Path, job_id: str) -> bool:
    """True when the job's folder is in place (it only ever appears complete)."""
    return (out / job_id / RECORD).is_file()


def result_line(job: Job, record: dict[str, Any]) -> dict[str, Any]:
    """The results.jsonl line of a finished job, from its record.json."""
    return {"id": job.id, "status": "ok", "line": job.line, "method": job.request.method, "folder": job.id,
            "files": record.get("files", []), "timings": record.get("timings", {}), "error": None}


def clean_staging(out: Path) -> int:
    """Remove staging folders a killed run left behind; returns how many."""
    stale = [p for p in out.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if out.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def append_line(path: Path, data: dict[str, Any]) -> None:
    """Append one JSON line (one write call, flushed) so a kill leaves at most a torn last line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(data) + "\n")
        handle.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a results/errors file; a line torn by a kill is ignored."""
    if not path.is_file():
        return []
    items = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            items.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return items


def write_atomic(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(item) + "\n" for item in lines), encoding="utf-8")
    os.replace(tmp, path)


def rebuild(out: Path, jobs: list[Job], failures: list[Failure]) -> tuple[int, int]:
    """Rewrite results.jsonl (every finished job, from its folder) and errors.jsonl (the last error of every
    job that is not finished; validation failures included) in job-file order; merge and remove the per-process
    files. Returns (results, errors)."""
    parts = sorted(out.glob("errors.rank*.jsonl"))
    errors: dict[tuple[str, int], dict[str, Any]] = {}  # (id, line): a duplicated id keeps its own error
    for path in [out / ERRORS, *parts]:
        for item in read_lines(path):
            errors[(str(item.get("id")), int(item.get("line") or 0))] = item
    for failure in failures:
        errors[(failure.id, failure.line)] = failure.record()
    streamed: dict[str, dict[str, Any]] = {}  # lines as the jobs ended (they say which process ran them)
    for path in [out / RESULTS, *sorted(out.glob("results.rank*.jsonl"))]:
        for item in read_lines(path):
            if item.get("status") == "ok":
                streamed[str(item.get("id"))] = item
    results = []
    for job in jobs:
        if finished(out, job.id):
            line = result_line(job, json.loads((out / job.id / RECORD).read_text()))
            results.append({**streamed.get(job.id, {}), **line})
            errors.pop((job.id, job.line), None)
    current = {(j.id, j.line) for j in jobs} | {(f.id, f.line) for f in failures}
    errors = {key: item for key, item in errors.items() if key in current}  # not from an older job file
    write_atomic(out / RESULTS, results)
    write_atomic(out / ERRORS, [errors[key] for key in sorted(errors, key=lambda k: k[1])])
    for path in [*parts, *out.glob("results.rank*.jsonl")]:
        path.unlink(missing_ok=True)
    return len(results), len(errors)


# -- processes ----------------------------------------------------------------------------------------------
class _OneProcess:
    """What the runner needs from accelerate's PartialState, for a run without a launcher."""

    num_processes, process_index, is_main_process, device = 1, 0, True, None

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, items: list, apply_padding: bool = False) -> Iterator[list]:
        yield items


def process_state(device: str = "auto") -> Any:
    """accelerate's ``PartialState`` (under ``accelerate launch``: this process's rank, device and share of
    the jobs) when accelerate is installed, else a one-process stand-in."""
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise AttnkitError("this looks like a multi-process launch but accelerate is not installed: "
                               "pip install -e \".[accelerate]\"") from None
        return _OneProcess()
    import torch

    # accelerate only forms a group of CPU processes when asked to (cpu=True); without it, processes launched on
    # a machine with no GPU would each run every job.
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the job in flight removes its staging folder on the way out."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- running jobs -------------------------------------------------------------------------------------------
def group_jobs(pipe: Any, jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs in groups that can share a UNet batch (at most ``batch_size``), in order of first appearance."""
    if batch_size <= 1:
        return [[j] for j in jobs]
    groups: list[list[Job]] = []
    open_groups: dict[Any, list[Job]] = {}
    for job in jobs:
        key = batch_key(pipe, job.request)
        if key is None:
            groups.append([job])
            continue
        group = open_groups.get(key)
        if group is None or len(group) >= batch_size:
            group = open_groups[key] = []
            groups.append(group)
        group.append(job)
    return groups


class JobRunner:
    """Runs jobs on one pipeline and writes their folders under ``out``: the part every process (and every
    Ray actor) shares. ``runner.run(jobs)`` yields one result or error line per job as it ends."""

    def __init__(self, pipe: Any, out: Path, ctx: RunContext, batch_size: int = 1) -> None:
        self.pipe, self.out, self.ctx, self.batch_size = pipe, Path(out), ctx, max(1, int(batch_size))

    def checked(self, jobs: list[Job]) -> tuple[list[Job], list[Failure]]:
        """Model-aware checks of every job (token limits, words, grids) before any sampling."""
        good, bad = [], []
        for job in jobs:
            try:
                check(self.pipe, job.request)
                good.append(job)
            except AttnkitError as error:
                bad.append(Failure(job.id, job.line, f"line {job.line}: {error}", stage="check"))
        return good, bad

    def _save(self, job: Job, output: Output) -> dict[str, Any]:
        with staged_folder(self.out / job.id) as folder:
            record = write_output(output, folder, self.ctx, out=self.out / job.id)
        return result_line(job, record)

    def _save_or_fail(self, job: Job, output: Output) -> dict[str, Any]:
        try:
            return self._save(job, output)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - e.g. a full disk: recorded, the batch goes on
            return self._failure(job, error)

    @staticmethod
    def _failure(job: Job, error: BaseException) -> dict[str, Any]:
        message = str(error) if isinstance(error, AttnkitError) else f"{type(error).__name__}: {error}"
        return Failure(job.id, job.line, f"line {job.line}: {message}", stage="run").record()

    def _one(self, job: Job) -> dict[str, Any]:
        if finished(self.out, job.id):  # a retried task (Ray) may meet jobs it already finished
            return result_line(job, json.loads((self.out / job.id / RECORD).read_text()))
        try:
            return self._save(job, execute(self.pipe, job.request, self.ctx))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - every failure is recorded and the batch goes on
            return self._failure(job, error)

    def run_group(self, group: list[Job]) -> list[dict[str, Any]]:
        """Run one group (one pipeline call when it has several jobs); returns their lines."""
        todo = [j for j in group if not finished(self.out, j.id)]
        if len(todo) <= 1:
            return [self._one(j) for j in group]
        try:
            outputs = execute_batch(self.pipe, [j.request for j in todo], self.ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - rerun one by one so the failure is blamed on the right job
            return [self._one(j) for j in group]
        by_id = {j.id: self._save_or_fail(j, o) for j, o in zip(todo, outputs, strict=True)}
        return [by_id.get(j.id) or self._one(j) for j in group]

    def run(self, jobs: list[Job], on_line: Callable[[dict[str, Any]], None] | None = None
            ) -> Iterator[dict[str, Any]]:
        """Run ``jobs`` (checked and grouped here), yielding one line per job as its group ends."""
        good, bad = self.checked(jobs)
        for failure in bad:
            yield failure.record()
        for group in group_jobs(self.pipe, good, self.batch_size):
            yield from self.run_group(group)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="job", desc=desc, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)  # tqdm's bar shows the rate (jobs/s) and the ETA


def run_batch(jobs_file: str | Path, out: str | Path, model: str | None = None, device: str = "auto",
              dtype: str = "float32", batch_size: int = 8, progress: bool = True,
              echo: Callable[[str], None] | None = None) -> Summary:
    """Run every job of ``jobs_file`` into ``out`` (resumable; see the module docstring).

    ``run_batch("jobs.jsonl", "out", model="tiny")``; under ``accelerate launch`` each process runs its share.
    """
    from attnkit.runs import load_model, resolve_device

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnkitError(f"--out {out} is a file: pass a folder")
    jobs, failures = read_jobs(jobs_file)  # every line validated before any work
    state = process_state(device)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_staging(out)
    state.wait_for_everyone()
    done = {j.id for j in jobs if finished(out, j.id)}
    pending = [j for j in jobs if j.id not in done]
    state.wait_for_everyone()  # every process has seen the same finished set before any starts work
    summary = Summary(skipped=len(done), total=len(jobs) + len(failures))
    results_path = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    errors_path = out / (ERRORS if world == 1 else f"errors.rank{rank}.jsonl")
    if state.is_main_process:
        for failure in failures:
            append_line(out / ERRORS, failure.record())
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
        device_name = str(state.device) if device == "auto" and state.device is not None else resolve_device(device)
        ctx = RunContext(model=model, device=device_name, dtype=dtype, progress=False)
        bar = _progress(len(mine), progress, f"batch [{rank + 1}/{world}]" if world > 1 else "batch")
        try:
            with _sigterm_as_interrupt():
                pipe = load_model(model, device_name, dtype) if mine else None
                runner = JobRunner(pipe, out, ctx, batch_size)
                for line in runner.run(mine) if mine else []:
                    ok = line["status"] == "ok"
                    line["process"] = rank
                    append_line(results_path if ok else errors_path, line)
                    summary.ok += ok
                    summary.errors += not ok
                    if not ok:
                        summary.failed_ids.append(line["id"])
                    bar.update(1)
                    bar.set_postfix(ok=summary.ok, errors=summary.errors, refresh=False)
        finally:
            bar.close()
    state.wait_for_everyone()
    if state.is_main_process:  # the totals of every process, from the files
        n_results, _ = rebuild(out, jobs, failures)
        summary.ok = n_results - len(done)
        summary.failed_ids = [str(e.get("id")) for e in read_lines(out / ERRORS)]
        summary.errors = len(summary.failed_ids)
    summary.seconds = round(time.perf_counter() - started, 3)
    if echo is not None and state.is_main_process:
        echo(f"{summary.ok} ok, {summary.errors} failed, {summary.skipped} already done"
             + (f" ({world} processes)" if world > 1 else "")
             + f"; {out / RESULTS}" + (f", errors in {out / ERRORS}" if summary.errors else ""))
    return summary
