"""The Maps tab: a prompt → the image and one heatmap per word (the word under each; click one to enlarge),
a step window and the layers to read; click the image for that pixel's self-attention.

``run_maps`` and ``self_attention_at`` are plain functions (the tests call them), ``build`` lays them out.
"""

from typing import Any

from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import Session, Workspace, files_of, friendly
from attnkit.runs import parse_request

TITLE = "Maps"
ABOUT = ("**What this does:** generates an image and shows, for each word of the prompt, where the model's "
         "cross-attention put it (averaged over the steps and layers you choose; DAAM / Prompt-to-Prompt's "
         "maps). Click a word's map to enlarge it; click the image to see where that pixel attends "
         "(self-attention).")
PLACES = ["down", "mid", "up"]


def run_maps(ws: Workspace, session: Session | None, prompt: str, seed: float, steps: float, guidance: float,
             res: Any, places: list[str], start: float, end: float) -> tuple:
    """One Maps run: (enlarged image, [(word map path, word)], download paths, CLI line, session)."""
    from attnkit.viz import enlarge

    session = session or Session()
    data: dict[str, Any] = {"method": "maps", "prompt": prompt, "seed": int(seed), "steps": int(steps),
                            "guidance": float(guidance)}
    if res not in (None, "", "auto"):
        data["res"] = int(res)
    if places and sorted(places) != sorted(PLACES):
        data["places"] = list(places)
    if (float(start), float(end)) != (0.0, 1.0):
        data["window"] = [float(start), float(end)]
    request = parse_request(data, where="Maps")
    output, record, folder = ws.run(session, request, keep_self_maps=True)
    store, res_used = output.result["store"], record["res"]
    session.self_maps = store.maps("self", res_used)[0].half()  # (h, w, h*w): clicking needs no new run
    session.maps_image = output.image("image.png")
    words = [(str(folder / name), extra["word"]) for name, _, extra in output.images if name.startswith("words/")]
    return enlarge(session.maps_image), words, files_of(folder, record), record["cli"], session


def self_attention_at(session: Session | None, x: float, y: float, size: tuple[int, int]) -> Any:
    """Where the pixel at (x, y) of the shown image (``size`` = width, height) attends, as an overlay."""
    from attnkit.engine import AttnkitError
    from attnkit.viz import enlarge, mark_point, overlay

    if session is None or session.self_maps is None:
        raise AttnkitError("run Maps first, then click on its image")
    h, w = session.self_maps.shape[:2]
    gy = min(h - 1, max(0, int(y * h / size[1])))
    gx = min(w - 1, max(0, int(x * w / size[0])))
    attended = session.self_maps[gy, gx].float().reshape(h, w)
    big = enlarge(session.maps_image.convert("RGB"))
    marked = overlay(big, attended)
    return mark_point(marked, (gy + 0.5) * big.height / h, (gx + 0.5) * big.width / w)


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    from attnkit.runs.methods import attention_grids, default_res

    grids = attention_grids(ws.pipe)
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square on a white background",
                                elem_id="maps-prompt", max_length=500)
            seed, steps, guidance = sampling_row(ws, "maps")
            with gr.Row():
                res = gr.Dropdown(label="Attention grid", choices=[str(g) for g in grids],
                                  value=str(default_res(ws.pipe)), elem_id="maps-res")
                places = gr.CheckboxGroup(label="UNet parts", choices=PLACES, value=PLACES, elem_id="maps-places")
            with gr.Row():
                start = gr.Slider(0, 1, value=0, step=0.05, label="Steps from (fraction)", elem_id="maps-start")
                end = gr.Slider(0, 1, value=1, step=0.05, label="Steps to (fraction)", elem_id="maps-end")
            run, cancel = run_buttons("maps")
        with gr.Column(scale=3):
            image = gr.Image(label="Image (click a pixel: its self-attention)", type="pil", interactive=False,
                             elem_id="maps-image")
            attends = gr.Image(label="Where that pixel attends", type="pil", interactive=False,
                               elem_id="maps-self")
    words = gr.Gallery(label="Cross-attention per word (click to enlarge)", columns=6, elem_id="maps-words",
                       allow_preview=True)
    files, cli = downloads_row("maps")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_maps(ws, session, *values)

    def on_select(session, evt: gr.SelectData):
        from attnkit.viz import enlarge

        shown = enlarge(session.maps_image).size if session and session.maps_image is not None else (1, 1)
        x, y = evt.index  # pixel of the image as shown (the enlarged one)
        return self_attention_at(session, x, y, shown)

    queue_run(ws, state, run, cancel, on_run, [state, prompt, seed, steps, guidance, res, places, start, end],
              [image, words, files, cli, state], api_name="maps")
    image.select(friendly(on_select), [state], [attends], queue=False, api_visibility="private")
