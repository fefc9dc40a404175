"""What the web app's tabs share: one pipeline, runs through :mod:`attnkit.runs`, each session's own folder,
cancellation, and errors turned into messages.

    ws = Workspace(pipe, out=Path("outputs/app"), ctx=RunContext(model="tiny"))
    output, record, folder = ws.run(session, parse_request({...}))   # files under out/<session>/<n>-<method>/

Every run of a pipeline goes through one lock (and one gradio queue, :data:`QUEUE`), so two users never sample
in the same pipeline at once. Cancelling sets the session's flag; a hook on the denoiser raises
:class:`Cancelled` at its next call (sampling, inversion and null-text optimisation all call it every step), the
engine's ``control()`` restores the processors on the way out and nothing is written.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attnkit.engine import AttnkitError
from attnkit.runs import Output, Request, RunContext, execute, staged_folder, write_output

QUEUE = "pipeline"  # gradio's concurrency id of every event that runs the pipeline (limit 1)
MAX_PROMPT_CHARS = 500
log = logging.getLogger("attnkit.app")


class Cancelled(Exception):
    """The user pressed Cancel: the run stopped at the next denoiser call."""


class Session:
    """One browser session's own things: its id (its folder's name), the last maps' self-attention, the
    real-image tab's inversion. (A plain class: gradio treats dataclasses in a State as JSON to send.)"""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.self_maps: Any = None  # (h, w, h*w) self-attention of the last Maps run, for clicking on the image
        self.maps_image: Any = None
        self.inversion_dir: str | None = None
        self.inversion_prompt: str | None = None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to call
        return None


def return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere). A run frees
    its tensors, but glibc keeps the pages in the arena of the worker thread that freed them, and gradio runs each
    request on whichever worker thread is free: without this the server's RSS creeps up run after run though
    nothing is kept."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def denoiser(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) or pipe.transformer


@contextmanager
def cancellable(pipe: Any, flag: threading.Event) -> Iterator[None]:
    """Raise :class:`Cancelled` at the denoiser's next call once ``flag`` is set (the hook is removed again)."""
    def check(module: Any, args: Any) -> None:
        if flag.is_set():
            raise Cancelled("cancelled")

    handle = denoiser(pipe).register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


class Workspace:
    """The app's server side: the pipeline, its lock, the output folder, the cancel flags of the runs under way
    (one per session while it runs, so nothing here grows with the number of sessions)."""

    def __init__(self, pipe: Any, out: Path, ctx: RunContext) -> None:
        self.pipe, self.out, self.ctx = pipe, Path(out).resolve(), ctx
        self.lock = threading.Lock()
        self.flags: dict[str, threading.Event] = {}
        self.counter = itertools.count(1)

    def folder(self, session: Session) -> Path:
        path = self.out / session.id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_upload(self, session: Session, image: Any) -> Path:
        """Save a decoded upload (a PIL image) in the session's ``uploads`` folder under a generated name (never
        the one the browser sent) and return its path: ``ws.save_upload(session, decode_image(data))``."""
        uploads = self.folder(session) / "uploads"
        uploads.mkdir(exist_ok=True)
        path = uploads / f"{uuid.uuid4().hex}.png"
        image.save(path)
        return path

    def new_folder(self, session: Session, name: str) -> Path:
        """A fresh, generated path under the session's folder (not created)."""
        return self.folder(session) / f"{next(self.counter):04d}-{name}"

    def run(self, session: Session, request: Request, keep_self_maps: bool = False) -> tuple[Output, dict, Path]:
        """Run ``request`` on the pipeline (one at a time) and write its files into a new run folder."""
        for key in ("prompt", "source"):
            text = request.args.get(key)
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                raise AttnkitError(f"the prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
        flag = self.flags[session.id] = threading.Event()
        ctx = RunContext(model=self.ctx.model, device=self.ctx.device, dtype=self.ctx.dtype, progress=True,
                         keep_self_maps=keep_self_maps)
        try:
            with self.lock, cancellable(self.pipe, flag):
                output = execute(self.pipe, request, ctx)
        finally:
            self.flags.pop(session.id, None)
            return_freed_memory()
        folder = self.new_folder(session, request.method)
        with staged_folder(folder) as staging:
            record = write_output(output, staging, ctx, out=folder)
        return output, record, folder

    def run_picture(self, session: Session, request: Request, picture: str) -> tuple:
        """Run ``request`` for a tab that shows one picture of the run: (that picture, download paths, CLI
        line, session). Usage: ``return ws.run_picture(session, request, "grid.png")``."""
        output, record, folder = self.run(session, request)
        return output.image(picture), files_of(folder, record), record["cli"], session

    def cancel(self, session: Session) -> None:
        """Stop the session's run under way at the denoiser's next call (nothing to do when none is)."""
        flag = self.flags.get(session.id)
        if flag is not None:
            flag.set()


def files_of(folder: Path, record: dict[str, Any]) -> list[str]:
    """The run's downloadable files (its PNGs and record.json), as paths."""
    return [str(folder / name) for name in record["files"] if name.endswith((".png", ".json"))]


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show attnkit's errors as a message in the page (no traceback); the app keeps serving."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Cancelled:
            raise gr.Error("Cancelled: nothing was written.", title="Cancelled") from None
        except AttnkitError as error:
            raise gr.Error(str(error), title="attnkit") from None
        except Exception as error:  # noqa: BLE001 - logged with its traceback on the server, a line in the page
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"unexpected error ({type(error).__name__}): {error}", title="error") from None

    return wrapper
