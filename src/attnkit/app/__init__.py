"""``attnkit app``: every method in the browser (gradio Blocks), one pipeline, one queue for it.

    attnkit app                       # the bundled model on http://127.0.0.1:7860
    attnkit app --model tiny --port 7861 --out outputs/app

In Python: ``demo, ws = attnkit.app.build_app(pipe, out, ctx)``. Needs ``pip install -e ".[app]"``; names are
imported on first use, so the CLI's ``--help`` does not load gradio.
"""

from typing import Any

__all__ = ["build_app", "launch"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'attnkit.app' has no attribute {name!r}")
    from attnkit.app import server

    return getattr(server, name)
