"""The Real image tab: upload → inversion (method choice, progress) → edits. The inversion is kept in the
session for further edits (no second inversion) and can be downloaded as a zip and uploaded again.
"""

from typing import Any

from attnkit.app.uploads import decode_image, unzip_inversion, zip_inversion
from attnkit.app.widgets import downloads_row, queue_run, run_buttons
from attnkit.app.workspace import QUEUE, Session, Workspace, files_of, friendly
from attnkit.engine import AttnkitError
from attnkit.runs import parse_request
from attnkit.runs.methods import ddim_for_the_run

TITLE = "Real image"
ABOUT = ("**What this does:** finds the noise (and, for null-text inversion, per-step unconditional embeddings) "
         "from which the model regenerates your image (Mokady et al., CVPR 2023), then edits it with "
         "Prompt-to-Prompt. The caption is the source prompt; edit it to say what should change. The inversion "
         "stays in this session: edit as often as you like, or download it and upload it again later.")


def _describe(record: dict[str, Any], inversion: Any) -> str:
    text = (f"Inverted with **{record['method']}**, {record['steps']} steps, guidance {record['guidance']:g}; "
            f"reconstruction PSNR **{record.get('psnr_reconstruction', float('nan')):.2f} dB**.")
    if inversion is not None and inversion.losses:
        losses = inversion.losses
        text += (f" Null-text loss: first step {losses[0]:.2e}, last {losses[-1]:.2e}; inner steps used "
                 f"{sum(inversion.inner_steps)} of {len(losses) * max(inversion.inner_steps or [1])}.")
    return text


def run_invert(ws: Workspace, session: Session | None, upload: bytes | None, caption: str, method: str,
               steps: float, guidance: float, inner_steps: float) -> tuple:
    """Invert an upload: (fitted input, reconstruction, status, inversion zip, download paths, CLI line, session)."""
    session = session or Session()
    image = decode_image(upload)
    path = ws.save_upload(session, image)
    request = parse_request({"method": "invert", "image": str(path), "prompt": caption, "inversion": method,
                             "steps": int(steps), "guidance": float(guidance), "inner_steps": int(inner_steps)},
                            where="Real image")
    output, record, folder = ws.run(session, request)
    session.inversion_dir, session.inversion_prompt = str(folder), caption
    archive = zip_inversion(folder, folder.with_name(folder.name + "-inversion.zip"))
    inversion = output.result["inversion"]
    return (inversion.image, output.image("reconstruction.png"), _describe(record, inversion), str(archive),
            files_of(folder, record), record["cli"], session)


def load_inversion(ws: Workspace, session: Session | None, upload: bytes | None) -> tuple:
    """Use an uploaded inversion zip: (its input image, status, session)."""
    from attnkit.inversion import Inversion

    session = session or Session()
    folder = unzip_inversion(upload, ws.new_folder(session, "loaded"))
    inversion = Inversion.load(folder)  # checks the record: format, version, tensors
    with ddim_for_the_run(ws.pipe):
        inversion.check_pipeline(ws.pipe)
    session.inversion_dir, session.inversion_prompt = str(folder), inversion.prompt
    return (inversion.image, f"Loaded an inversion of *{inversion.prompt}* ({inversion.method}, "
                             f"{inversion.steps} steps).", session)


def run_real_edit(ws: Workspace, session: Session | None, targets: str, cross: float, self_steps: float,
                  blend: str, paste_unedited: bool) -> tuple:
    """Edit the session's inversion: (grid, download paths, CLI line, session)."""
    if session is None or session.inversion_dir is None:
        raise AttnkitError("invert an image first (or load a saved inversion), then edit it")
    lines = [t.strip() for t in (targets or "").splitlines() if t.strip()]
    data: dict[str, Any] = {"method": "edit", "source": session.inversion_prompt, "targets": lines,
                            "image": session.inversion_dir, "cross": float(cross), "self": float(self_steps),
                            "paste_unedited": bool(paste_unedited)}
    if blend and blend.strip():
        data["blend"] = blend
    output, record, folder = ws.run(session, parse_request(data, where="Real image"))
    return output.image("grid.png"), files_of(folder, record), record["cli"], session


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    from attnkit.models import defaults_for

    d = defaults_for(ws.pipe)
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Image (PNG, JPEG, WebP; at most 20 MB and 4096x4096)", type="binary",
                             file_types=["image"], elem_id="real-upload")
            caption = gr.Textbox(label="Caption (the source prompt)", value="a red circle on a white background",
                                 elem_id="real-caption", max_length=500)
            with gr.Row():
                method = gr.Dropdown(label="Inversion", choices=["null-text", "negative-prompt", "ddim"],
                                     value="null-text", elem_id="real-method")
                steps = gr.Number(label="Steps", value=d.num_inference_steps, precision=0, minimum=1, maximum=1000,
                                  elem_id="real-steps")
                guidance = gr.Number(label="Guidance", value=7.5, minimum=0, elem_id="real-guidance")
                inner = gr.Number(label="Null-text inner steps", value=10, precision=0, minimum=1, maximum=100,
                                  elem_id="real-inner")
            invert, cancel = run_buttons("real", "Invert", "invert")
            saved = gr.File(label="Load a saved inversion (.zip)", type="binary", file_types=[".zip"],
                            elem_id="real-load")
        with gr.Column(scale=3):
            with gr.Row():
                fitted = gr.Image(label="Input (fitted to the model)", type="pil", interactive=False,
                                  elem_id="real-input")
                rebuilt = gr.Image(label="Reconstruction", type="pil", interactive=False, elem_id="real-rebuilt")
            status = gr.Markdown(elem_id="real-status")
            archive = gr.File(label="The inversion (download to reuse it)", elem_id="real-archive")
    targets = gr.Textbox(label="Edited prompts (one per line)", lines=2, value="a blue circle on a white background",
                         elem_id="real-targets")
    with gr.Row():
        cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention replaced for", elem_id="real-cross")
        self_steps = gr.Slider(0, 1, value=0.5, step=0.05, label="Self-attention replaced for", elem_id="real-self")
        blend = gr.Textbox(label="Local blend words", placeholder="circle", elem_id="real-blend")
        paste = gr.Checkbox(label="Keep the input's pixels outside the blend", value=False, elem_id="real-paste")
    run, cancel_edit = run_buttons("real", "Edit", "edit")
    grid = gr.Image(label="Input, reconstruction and edits", type="pil", interactive=False, elem_id="real-grid")
    files, cli = downloads_row("real")

    def on_invert(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_invert(ws, session, *values)

    def on_load(session, data):
        return load_inversion(ws, session, data)

    def on_edit(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_real_edit(ws, session, *values)

    queue_run(ws, state, invert, cancel, on_invert, [state, upload, caption, method, steps, guidance, inner],
              [fitted, rebuilt, status, archive, files, cli, state], api_name="invert")
    saved.upload(friendly(on_load), [state, saved], [fitted, status, state], concurrency_id=QUEUE,
                 concurrency_limit=1, api_name="load_inversion")
    queue_run(ws, state, run, cancel_edit, on_edit, [state, targets, cross, self_steps, blend, paste],
              [grid, files, cli, state], api_name="real_edit")
