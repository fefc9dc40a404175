"""The Concepts tab (MM-DiT models): ConceptAttention maps of a generated image or of an uploaded one, each
concept's overlay and each pixel's most salient concept."""

from typing import Any

from attnkit.app.uploads import decode_image
from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import Session, Workspace, files_of
from attnkit.runs import parse_request

TITLE = "Concepts"
ABOUT = ("**What this does:** ConceptAttention (Helbling et al., ICML 2025), on SD3 and FLUX models only. Each "
         "concept (a word that need not be in the prompt) rides along the text stream of the transformer's "
         "double-stream blocks without changing the image; a pixel's saliency for a concept is the softmax over the "
         "concepts of their attention outputs' dot products. Leave the image empty to map a generated image; upload "
         "one to map it (one noised pass; the prompt may then be a caption or anything).")


def concepts_request(prompt: str, concepts: str, blocks: str, noise: float, seed: float, steps: float,
                     guidance: float, image: str | None = None) -> dict[str, Any]:
    """The concepts job for the tab's fields (concepts separated by commas; blocks empty: the default)."""
    words = [c.strip() for c in (concepts or "").split(",") if c.strip()]
    data: dict[str, Any] = {"method": "concepts", "prompt": prompt, "concepts": words, "noise": float(noise),
                            "seed": int(seed), "steps": int(steps), "guidance": float(guidance)}
    if blocks and blocks.strip():
        data["blocks"] = blocks.strip()
    if image is not None:
        data["image"] = image
    return data


def run_concepts(ws: Workspace, session: Session | None, upload: bytes | None, prompt: str, *values: Any) -> tuple:
    """One Concepts run: (strip of overlays, segments, download paths, CLI line, session)."""
    session = session or Session()
    path = ws.save_upload(session, decode_image(upload)) if upload else None
    request = parse_request(concepts_request(prompt, *values, image=str(path) if path else None), where="Concepts")
    output, record, folder = ws.run(session, request)
    return (output.image("concepts.png"), output.image("segments.png"), files_of(folder, record), record["cli"],
            session)


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Image to map (optional; PNG/JPEG)", type="binary", elem_id="concepts-upload",
                             file_types=["image"])
            prompt = gr.Textbox(label="Prompt (or the image's caption)", elem_id="concepts-prompt", max_length=500,
                                value="a red circle and a blue square on a white background")
            concepts = gr.Textbox(label="Concepts (comma-separated)", elem_id="concepts-concepts", max_length=500,
                                  value="circle, square, background")
            with gr.Row():
                blocks = gr.Textbox(label="Blocks (e.g. 15,16,17,18; empty: the paper's last 4 of 19)",
                                    elem_id="concepts-blocks", max_length=200)
                noise = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Noise level of an upload's pass",
                                  elem_id="concepts-noise")
            seed, steps, guidance = sampling_row(ws, "concepts")
            run, cancel = run_buttons("concepts")
        with gr.Column(scale=3):
            strip = gr.Image(label="The image and each concept's map", type="pil", interactive=False,
                             elem_id="concepts-strip")
            segments = gr.Image(label="Each pixel's most salient concept", type="pil", interactive=False,
                                elem_id="concepts-segments")
    files, cli = downloads_row("concepts")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_concepts(ws, session, *values)

    inputs = [state, upload, prompt, concepts, blocks, noise, seed, steps, guidance]
    queue_run(ws, state, run, cancel, on_run, inputs, [strip, segments, files, cli, state], api_name="concepts")
