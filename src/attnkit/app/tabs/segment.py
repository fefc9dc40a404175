"""The Segment tab: self-segmentation of a generated image, or of an uploaded one, with each segment named by a
prompt word (label + score in the legend).
"""

from typing import Any

from attnkit.app.uploads import decode_image
from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import Session, Workspace, files_of
from attnkit.runs import parse_request

TITLE = "Segment"
ABOUT = ("**What this does:** clusters the model's self-attention into segments and names each one with the "
         "prompt word whose cross-attention covers it best (Patashnik et al., ICCV 2023: *kmeans*; DiffSeg, "
         "Tian et al., CVPR 2024: *merge*, no segment count needed). Leave the image empty to segment a "
         "generated image; upload one to segment it (its caption is the prompt; one noised pass, as DiffSeg).")


def segment_request(prompt: str, clustering: str, segments: float | None, threshold: float, refine: str,
                    seed: float, steps: float, guidance: float, image: str | None = None) -> dict[str, Any]:
    """The segment job for the tab's fields (``segments`` empty or 0: the method's default)."""
    data: dict[str, Any] = {"method": "segment", "prompt": prompt, "clustering": clustering,
                            "threshold": float(threshold), "refine": refine, "seed": int(seed), "steps": int(steps),
                            "guidance": float(guidance)}
    if segments:
        data["segments"] = int(segments)
    if image is not None:
        data["image"] = image
    return data


def run_segment(ws: Workspace, session: Session | None, upload: bytes | None, prompt: str, *values: Any) -> tuple:
    """One Segment run: (overlay with legend, legend text, download paths, CLI line, session)."""
    session = session or Session()
    path = ws.save_upload(session, decode_image(upload)) if upload else None
    request = parse_request(segment_request(prompt, *values, image=str(path) if path else None), where="Segment")
    output, record, folder = ws.run(session, request)
    legend = "\n".join(output.result.legend())
    return output.image("overlay.png"), legend, files_of(folder, record), record["cli"], session


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Image to segment (optional; PNG/JPEG)", type="binary", elem_id="segment-upload",
                             file_types=["image"])
            prompt = gr.Textbox(label="Prompt (or the image's caption)", elem_id="segment-prompt", max_length=500,
                                value="a red circle and a blue square on a white background")
            with gr.Row():
                clustering = gr.Dropdown(label="Method", choices=["kmeans", "merge"], value="kmeans",
                                         elem_id="segment-method")
                segments = gr.Number(label="Segments (kmeans; empty: 5)", value=None, precision=0, minimum=0,
                                     elem_id="segment-count")
                threshold = gr.Slider(0, 1, value=0.4, step=0.05, label="Label threshold",
                                      elem_id="segment-threshold")
                refine = gr.Dropdown(label="To pixels", choices=["bilateral", "none"], value="bilateral",
                                     elem_id="segment-refine")
            seed, steps, guidance = sampling_row(ws, "segment")
            run, cancel = run_buttons("segment")
        with gr.Column(scale=3):
            overlay = gr.Image(label="Segments (label and score in the legend)", type="pil", interactive=False,
                               elem_id="segment-overlay")
            legend = gr.Textbox(label="Segments", lines=4, elem_id="segment-legend")
    files, cli = downloads_row("segment")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_segment(ws, session, *values)

    inputs = [state, upload, prompt, clustering, segments, threshold, refine, seed, steps, guidance]
    queue_run(ws, state, run, cancel, on_run, inputs, [overlay, legend, files, cli, state], api_name="segment")
