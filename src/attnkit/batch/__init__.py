"""``attnkit batch``: run a JSONL file of jobs (generate, maps, edit, invert, ...) resumably, on one process,
on many (``accelerate launch -m attnkit batch ...``) or on a Ray cluster (``--ray``).

    from attnkit.batch import run_batch
    run_batch("jobs.jsonl", "out", model="tiny", batch_size=8)   # out/<id>/..., results.jsonl, errors.jsonl

Names are imported on first use, so the CLI's ``--help`` does not load torch.
"""

from typing import Any

_NAMES = {
    "Failure": "jobs", "Job": "jobs", "parse_jobs": "jobs", "read_jobs": "jobs",
    "ERRORS": "runner", "RESULTS": "runner", "JobRunner": "runner", "Summary": "runner", "run_batch": "runner",
    "run_batch_ray": "ray_runner",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'attnkit.batch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"attnkit.batch.{_NAMES[name]}"), name)
