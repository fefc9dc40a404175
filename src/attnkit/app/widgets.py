"""Pieces every tab lays out the same way: the seed/steps/guidance row, Run + Cancel, the downloads row, and
wiring a run to the pipeline's queue with a working Cancel. Element ids are ``<tab>-<what>`` (the browser test
finds them).

    seed, steps, guidance = sampling_row(ws, "maps")
    run, cancel = run_buttons("maps")
    files, cli = downloads_row("maps")
    queue_run(ws, state, run, cancel, on_run, inputs, outputs, api_name="maps")
"""

from collections.abc import Callable, Sequence
from typing import Any

from attnkit.app.workspace import QUEUE, Workspace, friendly


def sampling_row(ws: Workspace, tab: str, guidance: float | None = None) -> tuple[Any, Any, Any]:
    """Seed, steps and guidance inputs with the model's defaults (``guidance`` overrides the model's)."""
    import gradio as gr

    from attnkit.models import defaults_for

    d = defaults_for(ws.pipe)
    with gr.Row():
        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id=f"{tab}-seed")
        steps = gr.Number(label="Steps", value=d.num_inference_steps, precision=0, minimum=1, maximum=1000,
                          elem_id=f"{tab}-steps")
        scale = gr.Number(label="Guidance", value=d.guidance_scale if guidance is None else guidance, minimum=0,
                          elem_id=f"{tab}-guidance")
    return seed, steps, scale


def run_buttons(tab: str, label: str = "Run", what: str = "run") -> tuple[Any, Any]:
    """The primary button and its Cancel (ids ``<tab>-<what>`` and ``<tab>-cancel``)."""
    import gradio as gr

    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"{tab}-{what}")
        cancel = gr.Button("Cancel", elem_id=f"{tab}-cancel" if what == "run" else f"{tab}-cancel-{what}")
    return run, cancel


def downloads_row(tab: str) -> tuple[Any, Any]:
    """The run's files and the command line that makes it again."""
    import gradio as gr

    with gr.Row():
        files = gr.File(label="Downloads (PNGs with metadata, record.json)", file_count="multiple",
                        elem_id=f"{tab}-files")
        cli = gr.Textbox(label="The same on the command line", elem_id=f"{tab}-cli", buttons=["copy"])
    return files, cli


def queue_run(ws: Workspace, state: Any, button: Any, cancel: Any, fn: Callable[..., Any], inputs: Sequence[Any],
              outputs: Sequence[Any], api_name: str) -> Any:
    """``button`` runs ``fn`` in the pipeline's one queue, errors shown as messages; ``cancel`` stops it (the
    workspace's flag stops the denoiser at its next call; gradio's cancel drops the event)."""
    event = button.click(friendly(fn), list(inputs), list(outputs), concurrency_id=QUEUE, concurrency_limit=1,
                         api_name=api_name)
    cancel.click(lambda session: ws.cancel(session) if session else None, [state], None, queue=False,
                 api_visibility="private")
    cancel.click(None, None, None, cancels=[event], api_visibility="private")
    return event
