"""Model-family adapters: what the engine needs to know about one kind of denoiser.

    adapter = adapter_for(pipe)            # UNetAdapter, SD3Adapter or FluxAdapter
    tokenizer = text_tokenizer(pipe)       # numbers the cross-attention key columns of this pipeline

One adapter per family (``unet.py``, ``sd3.py``, ``flux.py``; ``joint.py`` is the joint-attention arithmetic
SD3 and FLUX share). Controllers never see an adapter: they see the engine's one protocol.
"""

from __future__ import annotations

from typing import Any

from attnkit.adapters.base import Adapter
from attnkit.engine import AttnkitError

SUPPORTED = ("UNet2DConditionModel pipelines (Stable Diffusion 1.x/2.x, SDXL), SD3Transformer2DModel pipelines "
             "(StableDiffusion3Pipeline: SD3, SD3.5) and FluxTransformer2DModel pipelines (FluxPipeline: FLUX.1)")


def _transformer_adapter(model: Any) -> type[Adapter] | None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from attnkit.adapters.flux import FluxAdapter
    from attnkit.adapters.sd3 import SD3Adapter

    if isinstance(model, SD3Transformer2DModel):
        return SD3Adapter
    if isinstance(model, FluxTransformer2DModel):
        return FluxAdapter
    return None


def adapter_for(pipe: Any) -> Adapter:
    """The adapter of ``pipe``'s denoiser, or an error naming the supported families."""
    from attnkit.adapters.unet import UNetAdapter

    unet = getattr(pipe, "unet", None)
    if unet is not None and hasattr(unet, "set_attn_processor"):
        return UNetAdapter(pipe, unet)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        cls = _transformer_adapter(transformer)
        if cls is not None:
            return cls(pipe, transformer)
        raise AttnkitError(f"{type(pipe).__name__} has a {type(transformer).__name__} transformer, which attnkit "
                           f"does not know; attnkit supports {SUPPORTED}")
    raise AttnkitError(f"{type(pipe).__name__} has no UNet or transformer with attention processors that attnkit "
                       f"knows; attnkit supports {SUPPORTED}")


def adapter_for_model(model: Any) -> Adapter:
    """The adapter of a bare denoiser (no pipeline around it: layer descriptions only)."""
    from attnkit.adapters.unet import UNetAdapter

    cls = _transformer_adapter(model)
    if cls is not None:
        return cls(None, model)
    if hasattr(model, "attn_processors"):
        return UNetAdapter(None, model)  # its layer names are checked against the UNet's
    raise AttnkitError(f"{type(model).__name__} has no attention processors; attnkit supports {SUPPORTED}")


def text_tokenizer(pipe: Any, max_sequence_length: int | None = None) -> Any:
    """The tokenizer whose positions are ``pipe``'s cross-attention key columns, for maps and edits.

    UNet pipelines: ``pipe.tokenizer``. SD3: a :class:`attnkit.tokens.SegmentedTokenizer` of CLIP (77 columns)
    then T5 (``max_sequence_length``, the pipeline's default 256). FLUX: T5 (``pipe.tokenizer_2``, default
    512 columns). Pass the ``max_sequence_length`` you give the pipeline. Usage::

        tok = attnkit.text_tokenizer(pipe)
        edit = attnkit.Replace(["a red circle", "a blue circle"], tok)
    """
    return adapter_for(pipe).text_tokenizer(max_sequence_length)


__all__ = ["Adapter", "SUPPORTED", "adapter_for", "adapter_for_model", "text_tokenizer"]
