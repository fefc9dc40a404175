"""The Stable Flow tab (MM-DiT models): edits that attend to the source's image keys and values in the vital
layers, of a generated image or of an uploaded one; a grid with each prompt under its image."""

from typing import Any

from attnkit.app.uploads import decode_image
from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import Session, Workspace
from attnkit.runs import parse_request

TITLE = "Stable Flow"
ABOUT = ("**What this does:** Stable Flow (Avrahami et al., CVPR 2025), on SD3 and FLUX models only. Every edited "
         "prompt is sampled from the source's noise, and in a few *vital* blocks its image tokens attend to the "
         "source's image keys and values, so identity and layout stay where the prompt does not ask for a change. "
         "Leave the layers empty to measure the vital layers first (each block bypassed once); upload an image to "
         "edit it (nudged by 1.15, Euler-inverted).")


def stable_flow_request(source: str, targets: str, layers: str, vital: float | None, seed: float, steps: float,
                        guidance: float, image: str | None = None) -> dict[str, Any]:
    """The stable-flow job for the tab's fields (targets one per line; layers comma-separated)."""
    lines = [t.strip() for t in (targets or "").splitlines() if t.strip()]
    data: dict[str, Any] = {"method": "stable-flow", "source": source, "targets": lines, "seed": int(seed),
                            "steps": int(steps), "guidance": float(guidance)}
    names = [n.strip() for n in (layers or "").split(",") if n.strip()]
    if names:
        data["layers"] = names
    elif vital:
        data["vital"] = int(vital)
    if image is not None:
        data["image"] = image
    return data


def run_stable_flow(ws: Workspace, session: Session | None, upload: bytes | None, source: str,
                    *values: Any) -> tuple:
    """One Stable Flow run: (grid image, download paths, CLI line, session)."""
    session = session or Session()
    path = ws.save_upload(session, decode_image(upload)) if upload else None
    request = parse_request(stable_flow_request(source, *values, image=str(path) if path else None),
                            where="Stable Flow")
    return ws.run_picture(session, request, "grid.png")


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Image to edit (optional; PNG/JPEG)", type="binary", elem_id="stable-flow-upload",
                             file_types=["image"])
            source = gr.Textbox(label="Source prompt (or the image's caption)", elem_id="stable-flow-source",
                                value="a red circle on a white background", max_length=500)
            targets = gr.Textbox(label="Edited prompts (one per line)", lines=3, elem_id="stable-flow-targets",
                                 value="a red circle and a blue square on a white background")
            with gr.Row():
                layers = gr.Textbox(label="Blocks (comma-separated; empty: measure the vital layers)",
                                    elem_id="stable-flow-layers", max_length=1000)
                vital = gr.Number(label="Vital blocks to use (empty: the paper's share)", value=None, precision=0,
                                  minimum=0, elem_id="stable-flow-vital")
            seed, steps, guidance = sampling_row(ws, "stable-flow")
            run, cancel = run_buttons("stable-flow")
        with gr.Column(scale=3):
            grid = gr.Image(label="Source and edits", type="pil", interactive=False, elem_id="stable-flow-grid")
    files, cli = downloads_row("stable-flow")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_stable_flow(ws, session, *values)

    inputs = [state, upload, source, targets, layers, vital, seed, steps, guidance]
    queue_run(ws, state, run, cancel, on_run, inputs, [grid, files, cli, state], api_name="stable_flow")
