"""The Style tab: shared attention across a batch of prompts. *Style Aligned* gives every prompt the first one's
style; *ConsiStory* keeps the first prompt's subject (a word of every prompt) the same; *MasaCtrl* edits the first
prompt's image into each other prompt (a new shape or pose) keeping its appearance. A grid with each prompt under
its image, the reference (source) first.
"""

from typing import Any

from attnkit.app.widgets import downloads_row, queue_run, run_buttons, sampling_row
from attnkit.app.workspace import MAX_PROMPT_CHARS, Session, Workspace
from attnkit.engine import AttnkitError
from attnkit.runs import parse_request

TITLE = "Style"
ABOUT = ("**What this does:** one prompt per line, generated together; the first is the reference and every "
         "other prompt attends to its keys and values. *Style Aligned* (Hertz, Voynov et al., CVPR 2024) "
         "normalises the targets' queries and keys to the reference's statistics (AdaIN) and lets them attend "
         "to it, so all images share its style; *shift* strengthens the reference (the paper's transfer "
         "setting: 0.693 = log 2). *ConsiStory* (Tewel et al., SIGGRAPH 2024) shares only inside the subject "
         "word's cross-attention mask, so the subject stays the same and the rest follows each prompt. "
         "*MasaCtrl* (Cao et al., ICCV 2023) starts every prompt from one noise and, from a start step and "
         "layer on, lets the targets' queries read only the source's keys and values: the first prompt's "
         "image changes its shape or pose and keeps its appearance (a mask word splits foreground from "
         "background).")
MODES = {"Style Aligned": "style", "ConsiStory (subject)": "consistent", "MasaCtrl (edit)": "mutual-edit"}
GROUP_NORM = {"auto (on for SD1.x/2.x, off for SDXL)": None, "on": True, "off": False}


def style_request(mode: str, prompts: str, style: str, shift: float, scale: float, adain_values: bool,
                  group_norm: str, only_self_level: float, subject: str, mask_dropout: float, seed: float,
                  steps: float, guidance: float, start_step: float = 4, start_layer: float = 0.625,
                  mask_word: str = "") -> dict[str, Any]:
    """The style, consistent or mutual-edit job for the tab's fields (prompts one per line; the other modes'
    fields are not used)."""
    if mode not in MODES:
        raise AttnkitError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    for line in lines:
        if len(line) > MAX_PROMPT_CHARS:
            raise AttnkitError(f"a prompt is {len(line)} characters long; the limit is {MAX_PROMPT_CHARS}")
    data: dict[str, Any] = {"method": MODES[mode], "prompts": lines, "seed": int(seed), "steps": int(steps),
                            "guidance": float(guidance)}
    if MODES[mode] == "consistent":
        return {**data, "subject": (subject or "").strip() or None, "mask_dropout": float(mask_dropout)}
    if MODES[mode] == "mutual-edit":
        del data["prompts"]
        data.update(source=lines[0] if lines else "", targets=lines[1:], start_step=float(start_step),
                    start_layer=float(start_layer))
        if len(lines) < 2:
            raise AttnkitError(f"MasaCtrl needs at least 2 prompts, one per line: the source first, then one target "
                               f"or more; got {len(lines)}")
        if mask_word and mask_word.strip():
            data["mask_words"] = [mask_word.strip()]
        return data
    if group_norm not in GROUP_NORM:
        raise AttnkitError(f"GroupNorm sharing {group_norm!r}: choose one of {', '.join(GROUP_NORM)}")
    data.update(shift=float(shift), scale=float(scale), adain_values=bool(adain_values),
                only_self_level=float(only_self_level))
    if style and style.strip():
        data["style"] = style.strip()
    if GROUP_NORM[group_norm] is not None:
        data["group_norm"] = GROUP_NORM[group_norm]
    return data


def run_style(ws: Workspace, session: Session | None, *values: Any) -> tuple:
    """One Style run: (grid image, download paths, CLI line, session)."""
    session = session or Session()
    data = style_request(*values)
    request = parse_request(data, where=TITLE)
    return ws.run_picture(session, request, "grid.png")


def build(ws: Workspace, state: Any) -> None:
    import gradio as gr

    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(label="Method", choices=list(MODES), value="Style Aligned", elem_id="style-mode")
            prompts = gr.Textbox(label="Prompts (one per line; the first is the reference)", lines=4,
                                 elem_id="style-prompts", max_length=4 * MAX_PROMPT_CHARS,
                                 value="a red circle on a white background\na blue square\na green triangle")
            with gr.Group(visible=True) as style_options:
                with gr.Row():
                    style = gr.Textbox(label="Style (appended to every prompt; optional)", placeholder="outlined",
                                       elem_id="style-style", max_length=200)
                    shift = gr.Slider(0, 2, value=0.0, step=0.01, label="Score shift (log; 0.693 = log 2)",
                                      elem_id="style-shift")
                    scale = gr.Number(label="Score scale", value=1.0, minimum=0, elem_id="style-scale")
                with gr.Row():
                    adain_values = gr.Checkbox(label="AdaIN on values too (queries and keys always)", value=False,
                                               elem_id="style-adain-values")
                    group_norm = gr.Dropdown(label="Share GroupNorm", choices=list(GROUP_NORM),
                                             value=next(iter(GROUP_NORM)), elem_id="style-group-norm")
                    only_self = gr.Slider(0, 1, value=0.0, step=0.05, label="Layers left unshared (fraction)",
                                          elem_id="style-only-self-level")
            with gr.Group(visible=False) as subject_options:
                with gr.Row():
                    subject = gr.Textbox(label="Subject (a word of every prompt)", placeholder="circle",
                                         elem_id="style-subject", max_length=50)
                    dropout = gr.Slider(0, 0.95, value=0.5, step=0.05, label="Mask dropout",
                                        elem_id="style-mask-dropout")
            with gr.Group(visible=False) as mutual_options:
                with gr.Row():
                    start_step = gr.Number(label="Start step (an index, or a fraction below 1)", value=4,
                                           minimum=0, elem_id="style-start-step")
                    start_layer = gr.Number(label="Start layer (an index, or a fraction below 1)", value=0.625,
                                            minimum=0, elem_id="style-start-layer")
                    mask_word = gr.Textbox(label="Mask word (optional; a word of every prompt)",
                                           placeholder="circle", elem_id="style-mask-word", max_length=50)
            seed, steps, guidance = sampling_row(ws, "style")
            run, cancel = run_buttons("style")
        with gr.Column(scale=3):
            grid = gr.Image(label="Reference and targets (prompt under each)", type="pil", interactive=False,
                            elem_id="style-grid")
    files, cli = downloads_row("style")

    def on_mode(choice):
        chosen = MODES.get(choice)
        return (gr.update(visible=chosen == "style"), gr.update(visible=chosen == "consistent"),
                gr.update(visible=chosen == "mutual-edit"))

    mode.change(on_mode, [mode], [style_options, subject_options, mutual_options], queue=False,
                api_visibility="private")

    def on_run(session, *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        return run_style(ws, session, *values)

    inputs = [state, mode, prompts, style, shift, scale, adain_values, group_norm, only_self, subject, dropout,
              seed, steps, guidance, start_step, start_layer, mask_word]
    queue_run(ws, state, run, cancel, on_run, inputs, [grid, files, cli, state], api_name="style")
