"""The Transfer tab: cross-image attention (appearance transfer). The structure and the appearance are each an
uploaded image (inverted) or a prompt (generated); the output has the structure's layout in the appearance's
look, shown as structure | appearance | output.
"""

from typing import Any

from attnkit.app.uploads import decode_image
from attnkit.app.widgets import downloads_row, queue_run, run_buttons
from attnkit.app.workspace import MAX_PROMPT_CHARS, Session, Workspace
from attnkit.engine import AttnkitError
from attnkit.runs import get_method, parse_request

TITLE = "Transfer"
ABOUT = ("**What this does:** the structure's layout in the appearance's look (Cross-Image Attention, Alaluf, "
         "Garibi et al., SIGGRAPH 2024). Each input is an uploaded image (inverted with edit-friendly DDPM "
         "inversion and the output prompt as its caption) or a prompt (generated). While the output is "
         "denoised from the structure's noise, its decoder self-attention takes keys and values from the "
         "appearance; *contrast* sharpens that attention, *swap guidance* pushes the output towards the "
         "swapped result, and AdaIN matches the objects' colours to the appearance's.")


def _default(name: str) -> Any:
    return get_method("transfer").field(name).default


def transfer_request(prompt: str, contrast: float, swap_guidance: float, adain: bool, steps: float, seed: float,
                     structure: str, appearance: str) -> dict[str, Any]:
    """The transfer job for the tab's fields (``structure``/``appearance``: a prompt or a saved upload's path;
    an empty output prompt: the structure's, when that is a prompt)."""
    data: dict[str, Any] = {"method": "transfer", "structure": structure, "appearance": appearance,
                            "contrast": float(contrast), "swap_guidance": float(swap_guidance),
                            "adain": bool(adain), "steps": int(steps), "seed": int(seed)}
    if prompt and prompt.strip():
        data["prompt"] = prompt.strip()
    return data


def _input(ws: Workspace, session: Session, role: str, upload: bytes | None, text: str | None) -> str:
    """An upload saved under a generated name in the session's folder (its path), else the typed prompt."""
    from attnkit.transfer import input_kind

    if upload:
        return str(ws.save_upload(session, decode_image(upload)))
    text = (text or "").strip()
    if not text:
        raise AttnkitError(f"the {role} is empty: upload an image or type a prompt for it")
    if len(text) > MAX_PROMPT_CHARS:
        raise AttnkitError(f"the {role} prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if input_kind(text) != "prompt":  # never read a file the server has because a user typed its name
        raise AttnkitError(f"the {role} prompt {text!r} looks like a file name: upload the image instead, or "
                           "write the prompt without a file extension or '/'")
    return text


def run_transfer(ws: Workspace, session: Session | None, structure_upload: bytes | None, structure_prompt: str,
                 appearance_upload: bytes | None, appearance_prompt: str, *values: Any) -> tuple:
    """One Transfer run: (structure | appearance | output strip, download paths, CLI line, session).
    ``values``: output prompt, contrast, swap guidance, AdaIN on/off, steps, seed."""
    session = session or Session()
    structure = _input(ws, session, "structure", structure_upload, structure_prompt)
    appearance = _input(ws, session, "appearance", appearance_upload, appearance_prompt)
    request = parse_request(transfer_request(*values, structure=structure, appearance=appearance), where=TITLE)
    return ws.run_picture(session, request, "strip.png")


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                with gr.Column():
                    structure_upload = gr.File(label="Structure image (optional; PNG/JPEG)", type="binary",
                                               file_types=["image"], elem_id="transfer-structure-upload")
                    structure_prompt = gr.Textbox(label="…or the structure as a prompt", max_length=MAX_PROMPT_CHARS,
                                                  value="a red circle on a white background",
                                                  elem_id="transfer-structure-prompt")
                with gr.Column():
                    appearance_upload = gr.File(label="Appearance image (optional; PNG/JPEG)", type="binary",
                                                file_types=["image"], elem_id="transfer-appearance-upload")
                    appearance_prompt = gr.Textbox(label="…or the appearance as a prompt",
                                                   max_length=MAX_PROMPT_CHARS,
                                                   value="a blue square on a black background",
                                                   elem_id="transfer-appearance-prompt")
            prompt = gr.Textbox(label="Output prompt (an uploaded image's caption too; empty: the structure prompt)",
                                max_length=MAX_PROMPT_CHARS, elem_id="transfer-prompt")
            with gr.Row():
                contrast = gr.Slider(0, 3, value=_default("contrast"), step=0.01, label="Attention contrast (1: off)",
                                     elem_id="transfer-contrast")
                swap = gr.Number(label="Swap guidance (1: off)", value=_default("swap_guidance"), minimum=1,
                                 elem_id="transfer-swap-guidance")
                adain = gr.Checkbox(label="AdaIN (match the objects' colours)", value=_default("adain"),
                                    elem_id="transfer-adain")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="transfer-seed")
                steps = gr.Number(label="Steps (the paper's 100; the first 32% skipped)", value=_default("steps"),
                                  precision=0, minimum=1, maximum=1000, elem_id="transfer-steps")
            run, cancel = run_buttons("transfer")
        with gr.Column(scale=3):
            strip = gr.Image(label="Structure | appearance | output", type="pil", interactive=False,
                             elem_id="transfer-strip")
    files, cli = downloads_row("transfer")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_transfer(ws, session, *values)

    inputs = [state, structure_upload, structure_prompt, appearance_upload, appearance_prompt, prompt, contrast,
              swap, adain, steps, seed]
    queue_run(ws, state, run, cancel, on_run, inputs, [strip, files, cli, state], api_name="transfer")
