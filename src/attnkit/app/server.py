"""Building and starting the web app: one pipeline, one tab per method, one queue for the pipeline.

    demo, ws = build_app(load_model("tiny"), out=Path("outputs/app"), ctx=RunContext(model="tiny"))
    launch(demo, ws, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit.app.uploads import MAX_UPLOAD_BYTES
from attnkit.app.workspace import Session, Workspace
from attnkit.engine import AttnkitError
from attnkit.runs import RunContext

HEADER = ("# attnkit\nAttention maps and attention control for diffusers pipelines. Model: **{model}**. Every "
          "result can be downloaded (PNGs carry the prompt and settings, `record.json` says what ran) and comes "
          "with the `attnkit` command that makes it again.")
# Gradio keeps a copy of the page's configuration for every session it has seen (~2.5 MB of RSS each with
# attnkit's tabs) until this many newer sessions push the oldest out, so the server's memory levels off instead of
# growing with every visitor. A pushed-out session starts afresh on its next request (a new folder; its kept
# inversion is gone from memory, its files stay on disk).
MAX_SESSIONS = 64


def build_app(pipe: Any, out: Path, ctx: RunContext) -> tuple[Any, Workspace]:
    """The gradio Blocks app and its :class:`Workspace` for ``pipe``; outputs go under ``out``."""
    import gradio as gr

    from attnkit.app.tabs import TABS

    pipe.set_progress_bar_config(disable=False)
    ws = Workspace(pipe, out, ctx)
    with gr.Blocks(title="attnkit") as demo:
        gr.Markdown(HEADER.format(model=ctx.model or "the bundled shapes-world model"))
        state = gr.State(Session)  # a callable: every browser session gets its own Session (and folder)
        with gr.Tabs():
            for tab in TABS:
                with gr.Tab(tab.TITLE, elem_id=f"tab-{tab.TITLE.lower().replace(' ', '-')}"):
                    tab.build(ws, state)
    demo.queue(default_concurrency_limit=1)
    return demo, ws


def launch(demo: Any, ws: Workspace, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           quiet: bool = False, max_sessions: int = MAX_SESSIONS) -> Any:
    """Serve the app (localhost unless ``host`` says otherwise); files are served only from the output folder;
    at most ``max_sessions`` sessions are kept in memory, the least recently used pushed out first."""
    if max_sessions < 1:
        raise AttnkitError(f"max_sessions={max_sessions}: keep at least one session")
    ws.out.mkdir(parents=True, exist_ok=True)
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
                       state_session_capacity=max_sessions,
                       allowed_paths=[str(ws.out)], max_file_size=MAX_UPLOAD_BYTES, show_error=False,
                       footer_links=["api"], ssr_mode=False)
