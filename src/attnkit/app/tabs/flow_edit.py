"""The Flow edit tab (MM-DiT models): edit an uploaded image on a flow model, by rectified-flow inversion and
regeneration or by FlowEdit; a grid with each prompt under its image and, for inversion, the reconstruction."""

from typing import Any

from attnkit.app.uploads import decode_image
from attnkit.app.widgets import downloads_row, queue_run, run_buttons
from attnkit.app.workspace import Session, Workspace, files_of
from attnkit.engine import AttnkitError
from attnkit.runs import parse_request

TITLE = "Flow edit"
ABOUT = ("**What this does:** edits a real image on SD3 and FLUX models. *Inversion* integrates the model's flow "
         "ODE from the image up to noise (Euler; or the second-order RF-Solver / FireFlow, more exact for the "
         "same model evaluations) and regenerates the edited prompt from that noise. *FlowEdit* (Kulikov et "
         "al.) never inverts: it moves the image along the difference of the edited and the source prompt's "
         "velocities, starting part-way (the paper's share of the steps).")
MODES = {"Inversion + regeneration": "rf-invert", "FlowEdit (no inversion)": "flow-edit"}
SOLVERS = ("fireflow", "rf-solver", "euler")


def flow_edit_request(mode: str, image: str | None, source: str, target: str, solver: str, steps: float,
                      guidance: float | None, seed: float) -> dict[str, Any]:
    """The rf-invert or flow-edit job for the tab's fields (``guidance``: the edit's, or FlowEdit's target
    guidance; empty: the default)."""
    if mode not in MODES:
        raise AttnkitError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if image is None:
        raise AttnkitError("no image: upload the image to edit (PNG/JPEG)")
    if MODES[mode] == "rf-invert":
        data: dict[str, Any] = {"method": "rf-invert", "image": image, "prompt": source, "targets": [target],
                                "solver": solver, "steps": int(steps)}
        if guidance is not None:
            data["edit_guidance"] = float(guidance)
        return data
    data = {"method": "flow-edit", "image": image, "source": source, "target": target, "steps": int(steps),
            "seed": int(seed)}
    if guidance is not None:
        data["target_guidance"] = float(guidance)
    return data


def run_flow_edit(ws: Workspace, session: Session | None, upload: bytes | None, mode: str, *values: Any) -> tuple:
    """One Flow edit run: (grid image, reconstruction or None, download paths, CLI line, session)."""
    session = session or Session()
    path = ws.save_upload(session, decode_image(upload)) if upload else None
    request = parse_request(flow_edit_request(mode, str(path) if path else None, *values), where="Flow edit")
    output, record, folder = ws.run(session, request)
    rebuilt = output.image("reconstruction.png") if MODES[mode] == "rf-invert" else None
    return output.image("grid.png"), rebuilt, files_of(folder, record), record["cli"], session


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    from attnkit.models import defaults_for

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Image to edit (PNG/JPEG)", type="binary", elem_id="flow-edit-upload",
                             file_types=["image"])
            mode = gr.Radio(list(MODES), value=next(iter(MODES)), label="Method", elem_id="flow-edit-mode")
            source = gr.Textbox(label="Caption of the image (source prompt)", elem_id="flow-edit-source",
                                value="a red circle on a white background", max_length=500)
            target = gr.Textbox(label="Edited prompt", elem_id="flow-edit-target",
                                value="a blue circle on a white background", max_length=500)
            with gr.Row():
                solver = gr.Dropdown(list(SOLVERS), value="fireflow", label="Solver (inversion)",
                                     elem_id="flow-edit-solver")
                steps = gr.Number(label="Steps", value=defaults_for(ws.pipe).num_inference_steps, precision=0,
                                  minimum=1, elem_id="flow-edit-steps")
                guidance = gr.Number(label="Edit guidance (empty: the default)", value=None,
                                     elem_id="flow-edit-guidance")
                seed = gr.Number(label="Seed (FlowEdit's noise)", value=0, precision=0, minimum=0,
                                 elem_id="flow-edit-seed")
            run, cancel = run_buttons("flow-edit")
        with gr.Column(scale=3):
            grid = gr.Image(label="Source and edit", type="pil", interactive=False, elem_id="flow-edit-grid")
            rebuilt = gr.Image(label="Reconstruction (inversion)", type="pil", interactive=False,
                               elem_id="flow-edit-reconstruction")
    files, cli = downloads_row("flow-edit")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_flow_edit(ws, session, *values)

    inputs = [state, upload, mode, source, target, solver, steps, guidance, seed]
    queue_run(ws, state, run, cancel, on_run, inputs, [grid, rebuilt, files, cli, state], api_name="flow_edit")
