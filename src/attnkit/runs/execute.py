"""Running a :class:`~attnkit.runs.spec.Request` and writing what it made: the same files and ``record.json``
whichever front end asked (the batch runner, the web app, and the CLI once it adopts this).

    pipe = load_model("tiny")
    ctx = RunContext(model="tiny")
    output = execute(pipe, parse_request({"method": "generate", "prompt": "a red circle"}), ctx)
    with staged_folder(Path("out/job1")) as folder:      # moved into place only when everything is written
        record = write_output(output, folder)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.engine import AttnkitError
from attnkit.runs.spec import Request, cli_line, to_json

RECORD = "record.json"
TINY_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
PNG_KEYS = ("prompt", "seed", "model", "steps", "guidance", "height", "width", "dtype", "attnkit_version")


@dataclass
class RunContext:
    """Where a run happens: the model's label (``None`` = the bundled model), device and dtype names, progress
    bars on or off, and front-end wishes (``keep_self_maps``: the app keeps self-attention for clicking)."""

    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = False
    keep_self_maps: bool = False


@dataclass
class Output:
    """What one run made: images to save (relative name, PIL image, extra PNG metadata), other files (names and
    a function writing them into a folder), settings for ``record.json``, timings, and the Python result."""

    request: Request
    images: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)
    writers: list[tuple[tuple[str, ...], Callable[[Path], None]]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    result: Any = None

    def image(self, name: str) -> Any:
        """The image saved as ``name`` (e.g. ``"image.png"``)."""
        for n, img, _ in self.images:
            if n == name:
                return img
        raise KeyError(name)


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when available, else ``"cpu"``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str | None, device: str = "cpu", dtype: str = "float32") -> Any:
    """The pipeline for a model name as front ends take it: ``None`` (the bundled model), ``"tiny"`` /
    ``"tiny-sdxl"`` (random test pipelines), a local folder or a hub id. ``load_model("tiny")``"""
    from attnkit.models import load_pipeline

    if model in TINY_MODELS:
        from attnkit.testing import tiny_pipeline

        return load_pipeline(tiny_pipeline(TINY_MODELS[model]), dtype=dtype, device=resolve_device(device))
    return load_pipeline(model, dtype=dtype, device=resolve_device(device))


def check(pipe: Any, request: Request) -> None:
    """Model-aware checks of ``request`` (token limits, words in the prompt, grid sizes); nothing is sampled."""
    spec = request.spec
    if spec.check is not None:
        spec.check(pipe, request.args)


def execute(pipe: Any, request: Request, ctx: RunContext | None = None) -> Output:
    """Run ``request`` on ``pipe``: the method's own Python call. The pipeline is left as it was."""
    ctx = ctx or RunContext()
    check(pipe, request)
    start = time.perf_counter()
    output = request.spec.run(pipe, request.args, ctx)
    output.request = request
    output.timings["total"] = round(time.perf_counter() - start, 3)
    return output


def batch_key(pipe: Any, request: Request) -> Any:
    """Requests with equal non-None keys can share one UNet batch (:func:`execute_batch`)."""
    spec = request.spec
    if spec.batch_key is None or spec.run_batch is None:
        return None
    key = spec.batch_key(pipe, request.args)
    return None if key is None else (spec.name, key)


def execute_batch(pipe: Any, requests: list[Request], ctx: RunContext | None = None) -> list[Output]:
    """Run requests of one :func:`batch_key` in one pipeline call; each output equals :func:`execute` of that
    request alone up to float rounding (the batch is only wider, every row keeps its own noise)."""
    ctx = ctx or RunContext()
    if len(requests) == 1:
        return [execute(pipe, requests[0], ctx)]
    keys = {batch_key(pipe, r) for r in requests}
    if len(keys) != 1 or None in keys:
        raise AttnkitError("these requests cannot share a batch (different method, steps, guidance or size)")
    for r in requests:
        check(pipe, r)
    start = time.perf_counter()
    outputs = requests[0].spec.run_batch(pipe, [r.args for r in requests], ctx)
    seconds = round(time.perf_counter() - start, 3)
    for r, out in zip(requests, outputs, strict=True):
        out.request = r
        out.timings["total"] = seconds
        out.timings["batch_size"] = len(requests)
    return outputs


def build_record(output: Output, ctx: RunContext, out: str | Path | None = None) -> dict[str, Any]:
    """``record.json`` of a run: what the CLI writes (command, prompt, model, device, dtype, version, settings,
    files, timings) plus the request itself and the command line that repeats it."""
    import attnkit

    request = output.request
    spec = request.spec
    record: dict[str, Any] = {
        "command": spec.name, "prompt": request.args.get(spec.prompt_field), "model": ctx.model or "bundled",
        "device": ctx.device, "dtype": ctx.dtype, "attnkit_version": attnkit.__version__,
    }
    record.update(json.loads(json.dumps(to_json(output.settings), default=str)))
    record["files"] = [name for names, _ in output.writers for name in names]
    record["files"] += [name for name, _, _ in output.images]
    record["files"].append(RECORD)
    record["timings"] = dict(output.timings)
    record["request"] = request.to_job()
    record["cli"] = cli_line(request, model=ctx.model, out=out, device=ctx.device, dtype=ctx.dtype)
    return record


def write_output(output: Output, folder: Path, ctx: RunContext | None = None, out: str | Path | None = None
                 ) -> dict[str, Any]:
    """Write the output's PNGs (prompt, seed and settings in their text chunks), other files and, last,
    ``record.json`` into ``folder``; returns the record. ``out``: the folder named in the record's CLI line."""
    from attnkit.viz import save_png

    ctx = ctx or RunContext()
    record = build_record(output, ctx, out if out is not None else folder)
    metadata = {k: record[k] for k in PNG_KEYS if k in record}
    for name, image, extra in output.images:
        save_png(image, folder / name, {**metadata, **extra})
    for _, writer in output.writers:
        writer(folder)
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``final`` that becomes ``final`` (one rename) only when the block
    succeeds; on an error nothing is left. ``final`` must not exist yet (finished runs are never overwritten)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise AttnkitError(f"{final} already exists: a finished run is never overwritten; remove it to redo it")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        yield staging
        os.replace(staging, final)  # atomic on one file system: the folder appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "word"
