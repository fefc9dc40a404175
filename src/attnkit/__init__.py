"""attnkit: the attention layers of text-to-image diffusion models in your hands."""

from attnkit.engine import (
    AttentionCall,
    AttnkitError,
    Controller,
    LayerInfo,
    Layout,
    Selection,
    control,
    describe_layers,
    shared_latents,
)
from attnkit.sampling import Generation, generate
from attnkit.store import AttentionStore

__all__ = [
    "AttentionCall",
    "AttentionStore",
    "Generation",
    "generate",
    "AttnkitError",
    "Controller",
    "LayerInfo",
    "Layout",
    "Selection",
    "control",
    "describe_layers",
    "shared_latents",
]
__version__ = "0.1.0"
