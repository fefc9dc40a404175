"""Controllers that plug into :func:`attnkit.control`, one paper per module."""

from attnkit.controllers.cross_image import CrossImageAttention, MaskedAdaIN
from attnkit.controllers.p2p import LocalBlend, Refine, Replace, Reweight, cross_alpha, self_window
from attnkit.controllers.shared import (
    MaskedMutualSelfAttention,
    MutualSelfAttention,
    StyleAligned,
    SubjectShare,
)

__all__ = ["CrossImageAttention", "MaskedAdaIN", "LocalBlend", "MaskedMutualSelfAttention", "MutualSelfAttention", "Refine", "Replace", "Reweight",
           "StyleAligned", "SubjectShare", "cross_alpha", "self_window"]
