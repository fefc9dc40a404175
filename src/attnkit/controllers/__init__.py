"""Controllers that plug into :func:`attnkit.control`, one paper per module."""

from attnkit.controllers.p2p import LocalBlend, Refine, Replace, Reweight, cross_alpha, self_window

__all__ = ["LocalBlend", "Refine", "Replace", "Reweight", "cross_alpha", "self_window"]
