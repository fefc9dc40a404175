"""The Edit tab: Prompt-to-Prompt on a source prompt and several edited prompts (the "lemon cake →
chocolate / beet / lego cake" series), with the cross/self schedules, re-weighting and local blend; a grid
with each prompt under its image.
"""

from typing import Any

from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import Session, Workspace
from attnkit.runs import parse_request

TITLE = "Edit"
ABOUT = ("**What this does:** Prompt-to-Prompt (Hertz et al., ICLR 2023). The source prompt and each edited "
         "prompt are sampled from one noise; the edits borrow the source's attention maps, so the layout stays "
         "while the swapped words change. *Cross* / *self* say for which fraction of the steps the maps are "
         "replaced, *re-weight* scales a word's attention (`lego=2`), *local blend* keeps everything outside "
         "the named words' region.")


def edit_request(source: str, targets: str, kind: str, cross: float, self_steps: float, self_res: float,
                 reweight: str, blend: str, blend_threshold: float, seed: float, steps: float,
                 guidance: float) -> dict[str, Any]:
    """The edit job for the tab's fields (targets one per line; reweight as ``word=factor, ...``)."""
    lines = [t.strip() for t in (targets or "").splitlines() if t.strip()]
    data: dict[str, Any] = {"method": "edit", "source": source, "targets": lines, "kind": kind,
                            "cross": float(cross), "self": float(self_steps), "self_res": int(self_res),
                            "seed": int(seed), "steps": int(steps), "guidance": float(guidance)}
    if reweight and reweight.strip():
        data["reweight"] = reweight
    if blend and blend.strip():
        data["blend"] = blend
        data["blend_threshold"] = float(blend_threshold)
    return data


def run_edit(ws: Workspace, session: Session | None, *values: Any) -> tuple:
    """One Edit run: (grid image, download paths, CLI line, session)."""
    session = session or Session()
    request = parse_request(edit_request(*values), where="Edit")
    return ws.run_picture(session, request, "grid.png")


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Textbox(label="Source prompt", value="a red circle on a white background",
                                elem_id="edit-source", max_length=500)
            targets = gr.Textbox(label="Edited prompts (one per line)", lines=3, elem_id="edit-targets",
                                 value="a blue circle on a white background\na green circle on a white background")
            with gr.Row():
                kind = gr.Dropdown(label="Edit", choices=["auto", "replace", "refine"], value="auto",
                                   elem_id="edit-kind")
                cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention replaced for", elem_id="edit-cross")
                self_steps = gr.Slider(0, 1, value=0.4, step=0.05, label="Self-attention replaced for",
                                       elem_id="edit-self")
                self_res = gr.Number(label="Self-attention grids up to", value=16, precision=0, minimum=1,
                                     elem_id="edit-self-res")
            with gr.Row():
                reweight = gr.Textbox(label="Re-weight (word=factor, ...)", placeholder="blue=2",
                                      elem_id="edit-reweight")
                blend = gr.Textbox(label="Local blend words", placeholder="circle", elem_id="edit-blend")
                threshold = gr.Slider(0, 1, value=0.3, step=0.05, label="Blend threshold", elem_id="edit-threshold")
            seed, steps, guidance = sampling_row(ws, "edit")
            run, cancel = run_buttons("edit")
        with gr.Column(scale=3):
            grid = gr.Image(label="Source and edits (prompt under each)", type="pil", interactive=False,
                            elem_id="edit-grid")
    files, cli = downloads_row("edit")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_edit(ws, session, *values)

    inputs = [state, source, targets, kind, cross, self_steps, self_res, reweight, blend, threshold, seed, steps,
              guidance]
    queue_run(ws, state, run, cancel, on_run, inputs, [grid, files, cli, state], api_name="edit")
