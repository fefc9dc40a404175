"""The ``attnkit app`` command (registered in :mod:`attnkit.cli`); imports nothing heavy until it runs.

    attnkit app --model tiny --port 7861
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def app_command(
    model: Annotated[str | None, typer.Option(
        help="A local pipeline folder, a hub id, or 'tiny'/'tiny-sdxl'. Default: the bundled model.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; the default serves this machine only. "
                                           "0.0.0.0 serves everyone who can reach it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    out: Annotated[Path, typer.Option(help="Where results are written (one folder per browser session).")] =
        Path("outputs/app"),
    device: Annotated[str, typer.Option(help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 (fp32), float16 (fp16) or bfloat16 (bf16).")] = "float32",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No start-up messages.")] = False,
    max_sessions: Annotated[int, typer.Option(
        help="Sessions kept in memory (about 2.5 MB each); the least recently used one is dropped first and "
             "starts afresh on its next request.")] = 64,
) -> None:
    """Start the web app: one tab per method (Maps, Edit, Real image, ...) on one pipeline; every result
    downloadable with its record.json and the attnkit command that makes it again."""
    from attnkit.engine import AttnkitError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise AttnkitError("the app needs gradio: pip install -e \".[app]\"") from None
    if threads is not None:
        if threads < 1:
            raise AttnkitError(f"--threads {threads}: give a positive number of threads")
        import torch

        torch.set_num_threads(threads)
    if max_sessions < 1:
        raise AttnkitError(f"--max-sessions {max_sessions}: keep at least one session")
    if not 0 < port < 65536:
        raise AttnkitError(f"--port {port}: give a port from 1 to 65535")
    import transformers

    from attnkit.app.server import build_app, launch
    from attnkit.runs import RunContext, load_model, resolve_device

    transformers.utils.logging.set_verbosity_error()
    device = resolve_device(device)
    pipe = load_model(model, device, dtype)
    demo, ws = build_app(pipe, out, RunContext(model=model, device=device, dtype=dtype))
    if not quiet and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"attnkit: serving on {host}: anyone who can reach this machine can use the app", err=True)
    launch(demo, ws, host=host, port=port, quiet=quiet, max_sessions=max_sessions)
