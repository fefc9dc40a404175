"""A JSONL job file: one job per line, ``{"id": ..., "method": ..., **arguments}``, every line validated first.

    jobs, invalid = read_jobs("jobs.jsonl")     # [Job(id, line, request, raw)], [Failure(id, line, error)]

Ids name the job's output folder, so they must be unique and file-name safe; blank lines and lines starting with
``#`` are skipped. A bad line never stops the others: it becomes a :class:`Failure` naming the line and field.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.engine import AttnkitError
from attnkit.runs import Request, parse_request

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Job:
    """One valid line: its id, 1-based line number, validated request and the line's own JSON object."""

    id: str
    line: int
    request: Request
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Failure:
    """A job that did not run (or not to the end): its id (``line-N`` when it had none), line and message."""

    id: str
    line: int
    error: str
    stage: str = "validate"  # "validate" (the line), "check" (against the model) or "run"

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "status": "error", "line": self.line, "stage": self.stage, "error": self.error}


def read_lines(source: str | Path) -> list[str]:
    """The lines of a job file (``"-"``: standard input)."""
    if str(source) == "-":
        return sys.stdin.read().splitlines()
    path = Path(source)
    if not path.is_file():
        raise AttnkitError(f"job file {str(path)!r} does not exist: pass a JSONL file with one job per line")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise AttnkitError(f"job file {str(path)!r} is not UTF-8 text ({error})") from error


def parse_jobs(lines: list[str]) -> tuple[list[Job], list[Failure]]:
    """Validate every line: (valid jobs, failures), both in file order."""
    jobs: list[Job] = []
    failures: list[Failure] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"line {number}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            failures.append(Failure(f"line-{number}", number, f"{where}: not valid JSON ({error.msg} at column "
                                                              f"{error.colno})"))
            continue
        job_id = data.get("id") if isinstance(data, dict) else None
        fallback = f"line-{number}"
        if not isinstance(job_id, str) or not ID.fullmatch(job_id):
            problem = "is required" if job_id is None else f"{job_id!r} is not a usable id"
            failures.append(Failure(fallback, number, f"{where}: field 'id' {problem}: give each job a unique id "
                                                      "of letters, digits, '.', '_' or '-' (it names the job's "
                                                      "output folder)"))
            continue
        if job_id in seen:
            failures.append(Failure(job_id, number, f"{where}: field 'id': {job_id!r} is already used on line "
                                                    f"{seen[job_id]}: ids must be unique"))
            continue
        seen[job_id] = number
        try:
            request = parse_request(data, where=where)
        except AttnkitError as error:
            failures.append(Failure(job_id, number, str(error)))
            continue
        jobs.append(Job(job_id, number, request, data))
    return jobs, failures


def read_jobs(source: str | Path) -> tuple[list[Job], list[Failure]]:
    """Read and validate a job file (``"-"``: standard input): (valid jobs, failures)."""
    return parse_jobs(read_lines(source))
