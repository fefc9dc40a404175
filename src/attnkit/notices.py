"""The error and the warning attnkit gives its users. Plain Python (no torch), so that the CLI can refuse bad
arguments before it imports anything heavy; ``attnkit.AttnkitError`` is the same class.

    import warnings
    warnings.simplefilter("ignore", attnkit.notices.AttnkitWarning)   # silence attnkit's warnings in a script

The CLI prints each as one line (``attnkit: error: ...`` with exit code 2, ``attnkit: warning: ...``).
"""

from __future__ import annotations

import logging
import warnings


class AttnkitError(ValueError):
    """A problem with the user's input or set-up; the message names the problem and the fix."""


class AttnkitWarning(UserWarning):
    """Something will run, but probably not as the user meant (unknown words, float16 on a CPU, ...)."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Issue an :class:`AttnkitWarning` (Python shows each distinct message once per call site)."""
    warnings.warn(message, AttnkitWarning, stacklevel=stacklevel)


class _NoTorchvisionNote(logging.Filter):
    """Drops transformers' note that an image processor falls back to PIL without torchvision: every Stable
    Diffusion pipeline names image processors (safety checker, IP adapters) that attnkit never runs, so the
    note (two lines per script) only confuses. Nothing else transformers says is filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


def mute_torchvision_note() -> None:
    """Install :class:`_NoTorchvisionNote` on transformers' import logger (once; ``import attnkit`` does it)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionNote) for f in logger.filters):
        logger.addFilter(_NoTorchvisionNote())
