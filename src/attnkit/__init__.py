"""attnkit: the attention layers of text-to-image diffusion models in your hands."""

from attnkit.controllers import LocalBlend, Refine, Replace, Reweight
from attnkit.edit import EditResult, edit
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
from attnkit.inversion import Inversion, invert
from attnkit.models import ModelDefaults, defaults_for, load_pipeline
from attnkit.sampling import Generation, generate
from attnkit.store import AttentionStore
from attnkit.viz import image_grid, map_grid, overlay, read_png_metadata, save_png, word_strip

__all__ = [
    "EditResult",
    "LocalBlend",
    "Refine",
    "Replace",
    "Reweight",
    "edit",
    "AttentionCall",
    "AttentionStore",
    "Generation",
    "generate",
    "Inversion",
    "invert",
    "AttnkitError",
    "Controller",
    "LayerInfo",
    "Layout",
    "Selection",
    "control",
    "describe_layers",
    "shared_latents",
    "ModelDefaults",
    "defaults_for",
    "load_pipeline",
    "image_grid",
    "map_grid",
    "overlay",
    "read_png_metadata",
    "save_png",
    "word_strip",
]
__version__ = "0.1.0"
