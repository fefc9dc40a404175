"""The ``attnkit batch`` command (registered in :mod:`attnkit.cli`); imports nothing heavy until it runs.

    attnkit batch jobs.jsonl --out outputs/batch --batch-size 8
    accelerate launch --num_processes 2 -m attnkit batch jobs.jsonl --out outputs/batch
    attnkit batch jobs.jsonl --out /shared/batch --ray --ray-address auto --actors 4 --num-gpus 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def batch_command(
    jobs: Annotated[str, typer.Argument(help="A JSONL file, one job per line: {\"id\": ..., \"method\": "
                                             "\"generate\"|\"maps\"|\"edit\"|\"invert\", ...arguments}; '-' reads "
                                             "standard input.")],
    out: Annotated[Path, typer.Option(help="Output folder: OUT/<id>/ per job, results.jsonl, errors.jsonl.")] =
        Path("outputs/batch"),
    model: Annotated[str | None, typer.Option(
        help="A local pipeline folder, a hub id, or 'tiny'/'tiny-sdxl'. Default: the bundled model.")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Compatible jobs (same method, steps, guidance, size) run this many at a time in one UNet batch; "
             "1 runs every job alone.")] = 8,
    device: Annotated[str, typer.Option(
        help="'auto' (under accelerate: this process's device; else cuda when available), 'cpu', 'cuda', ...")]
        = "auto",
    dtype: Annotated[str, typer.Option(help="float32 (fp32), float16 (fp16) or bfloat16 (bf16).")] = "float32",
    ray: Annotated[bool, typer.Option("--ray", help="Run through Ray Data (a local Ray instance unless "
                                                    "--ray-address names a cluster).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster to join ('auto' or ray://HOST:10001); implies --ray.")] = None,
    actors: Annotated[int, typer.Option(help="Ray: actors, one pipeline each.")] = 1,
    num_gpus: Annotated[float, typer.Option(help="Ray: GPUs per actor (0 on a CPU cluster).")] = 0.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch in each process.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Run a JSONL file of jobs; rerun the same command to resume (finished jobs are skipped). Exit code 1 when
    a job failed (see OUT/errors.jsonl), 130 when interrupted."""
    from attnkit.engine import AttnkitError

    if batch_size < 1 or actors < 1 or num_gpus < 0:
        raise AttnkitError("--batch-size and --actors must be at least 1, --num-gpus at least 0")
    if threads is not None:
        if threads < 1:
            raise AttnkitError(f"--threads {threads}: give a positive number of threads")
        import torch

        torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    echo = None if quiet else (lambda text: typer.echo(text, err=True))
    try:
        if ray or ray_address:
            from attnkit.batch.ray_runner import run_batch_ray

            summary = run_batch_ray(jobs, out, model=model, device=device, dtype=dtype, batch_size=batch_size,
                                    address=ray_address, actors=actors, num_gpus=num_gpus, threads=threads,
                                    progress=not quiet, echo=echo)
        else:
            from attnkit.batch.runner import run_batch

            summary = run_batch(jobs, out, model=model, device=device, dtype=dtype, batch_size=batch_size,
                                progress=not quiet, echo=echo)
    except KeyboardInterrupt:
        typer.echo(f"attnkit: interrupted; finished jobs are kept in {out}: run the same command again to "
                   "resume", err=True)
        raise typer.Exit(code=130) from None
    if summary.errors:
        raise typer.Exit(code=1)
