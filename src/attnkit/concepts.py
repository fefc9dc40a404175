"""Concept maps with ConceptAttention (Helbling et al., ICML 2025) on MM-DiT pipelines (SD3/SD3.5, FLUX.1).

    maps = attnkit.concept_maps(pipe, "a red circle and a blue square", ["circle", "square", "background"])
    maps["circle"]                  # (h, w) at the image-token grid; maps.upsample() at image size
    labels = maps.segment()         # (H, W) index of the most salient concept per pixel

For a generated image the maps are averaged over every sampling step; for a real image (``image=``) the image
is encoded, noised to ``noise_level`` (the flow's σ; the paper's 0.5: step 2 of FLUX-schnell's 4) and run
through the transformer once per ``samples`` (fresh noise each), as the official ``encode_image`` does. How the
maps are made is :class:`attnkit.controllers.concepts.ConceptAttention`.

Concept embeddings (:func:`embed_concepts`): each concept is encoded on its own by the pipeline's text
encoders, and its tokens' embeddings in the last text segment (FLUX: T5, as the paper; SD3: T5, or CLIP where the
pipeline has no T5) are averaged: for a one-token concept exactly the paper's first token. Where attnkit
differs from the official FLUX code: the concept stream is modulated by the prompt's timestep/pooled
embedding (the official code recomputes it with a zero pooled CLIP vector).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from attnkit.controllers.concepts import ConceptAttention, default_blocks
from attnkit.engine import AttnkitError, Controller, control

DEFAULT_NOISE = 0.5  # the official encode_image: timesteps[2] of FLUX-schnell's 4-step schedule (σ = 0.5)


@dataclass
class ConceptMaps:
    """What :func:`concept_maps` returns: ``maps`` ``(concepts, h, w)`` at the image-token grid (a softmax over
    the concepts per token, averaged over layers and steps), the image they explain, and how they were made."""

    concepts: list[str]
    maps: torch.Tensor
    image: Image.Image
    prompt: str
    layers: list[str]
    steps: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, concept: str | int) -> torch.Tensor:
        return self.maps[self._index(concept)]

    def _index(self, concept: str | int) -> int:
        if isinstance(concept, int):
            if not 0 <= concept < len(self.concepts):
                raise AttnkitError(f"concept {concept} does not exist: there are {len(self.concepts)}")
            return concept
        if concept not in self.concepts:
            raise AttnkitError(f"{concept!r} is not one of the concepts: {', '.join(map(repr, self.concepts))}")
        return self.concepts.index(concept)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{concept: (h, w) map}`` (for :func:`attnkit.word_strip`)."""
        return {c: self.maps[i] for i, c in enumerate(self.concepts)}

    def upsample(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(concepts, H, W)`` bilinearly upsampled to ``size`` (height, width; default the image's size)."""
        height, width = size or (self.image.height, self.image.width)
        return F.interpolate(self.maps[None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0]

    def segment(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(H, W)`` long tensor: the index (into ``concepts``) of the most salient concept per pixel, at
        ``size`` (default the image's; ``size=maps.maps.shape[1:]`` for the token grid)."""
        return self.upsample(size).argmax(dim=0)

    def mask(self, concept: str | int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Boolean ``(H, W)`` mask of the pixels where ``concept`` is the most salient."""
        return self.segment(size) == self._index(concept)

    def strip(self) -> Image.Image:
        """The image and one overlay per concept, the concept under each."""
        from attnkit.viz import word_strip

        return word_strip(self.image, self.as_dict())

    def record(self) -> dict[str, Any]:
        return {"method": "concept-attention", "prompt": self.prompt, "concepts": self.concepts,
                "layers": self.layers, "steps": self.steps, **self.settings, "seconds": round(self.seconds, 3)}


def check_concepts(concepts: Sequence[str]) -> list[str]:
    """The concept list, or a clear error: at least one, non-empty strings, no duplicates."""
    if isinstance(concepts, str):
        raise AttnkitError("concepts must be a list of words, e.g. ['circle', 'square', 'background'], not one "
                           "string")
    out = [str(c).strip() for c in concepts]
    if not out:
        raise AttnkitError("no concepts given: pass words such as ['circle', 'square', 'background']")
    if any(not c for c in out):
        raise AttnkitError("a concept is empty: every concept must be a word or a short phrase")
    if len(set(out)) != len(out):
        raise AttnkitError(f"concepts repeat: {out}; give each concept once")
    return out


def embed_concepts(pipe: Any, concepts: Sequence[str]) -> torch.Tensor:
    """``(concepts, dim)`` concept embeddings in ``pipe``'s prompt-embedding space (see the module docstring).
    ``tokens = embed_concepts(pipe, ["circle", "background"])``"""
    from attnkit.adapters import adapter_for
    from attnkit.tokens import _named_parts, check_prompt_length, word_spans

    concepts = check_concepts(concepts)
    adapter = adapter_for(pipe)
    tokenizer = adapter.text_tokenizer()
    for c in concepts:
        check_prompt_length(tokenizer, c)
    embeds = adapter.prompt_embeddings(concepts)  # (concepts, columns, dim)
    parts = _named_parts(tokenizer)
    first, length = parts[-1][1], parts[-1][2]
    rows = []
    for i, concept in enumerate(concepts):
        columns = [t for span in word_spans(tokenizer, concept) for t in span.tokens if first <= t < first + length]
        if not columns:
            raise AttnkitError(f"the text encoder gives the concept {concept!r} no tokens")
        rows.append(embeds[i, columns].float().mean(dim=0))
    return torch.stack(rows)


def concept_maps(pipe: Any, prompt: str, concepts: Sequence[str], *controllers: Controller, image: Any = None,
                 blocks: Sequence[int] | None = None, timesteps: int | float | tuple | None = None, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, noise_level: float = DEFAULT_NOISE, samples: int = 1,
                 progress: bool = True) -> ConceptMaps:
    """ConceptAttention maps of ``concepts`` for the image ``prompt`` generates, or for a real ``image``.

    Usage: ``attnkit.concept_maps(pipe, "a red circle", ["circle", "background"]).segment()``

    ``blocks``: double-stream blocks averaged (default: the paper's last 4 of 19, relative to the depth);
    ``timesteps``: the sampling steps averaged (default all). Generation takes ``seed``, ``steps``,
    ``guidance``, ``height``, ``width`` as :func:`attnkit.generate`. A real ``image`` (path, PIL image, array)
    is fitted to the model's size, encoded, noised to ``noise_level`` (σ in (0, 1]) and passed through the
    transformer ``samples`` times (noise seeds ``seed``, ``seed + 1``, ...); ``prompt`` may then be ``""`` (the
    paper's default). Other ``controllers`` (an :class:`attnkit.AttentionStore`) run in the same passes.
    """
    from attnkit.adapters import adapter_for

    concepts = check_concepts(concepts)
    if not isinstance(prompt, str):
        raise AttnkitError(f"the prompt must be a string, got {type(prompt).__name__}")
    if image is None and not prompt.strip():
        raise AttnkitError("the prompt is empty: give the prompt to generate from (or image= for a real image)")
    if adapter_for(pipe).family not in ConceptAttention.families:
        raise AttnkitError(f"ConceptAttention needs an MM-DiT pipeline (SD3/SD3.5 or FLUX.1); "
                           f"{type(pipe).__name__} has a UNet without a text stream")
    controller = ConceptAttention(embed_concepts(pipe, concepts), blocks=blocks, steps=timesteps)
    start = time.perf_counter()
    if image is None:
        from attnkit.sampling import generate

        result = generate(pipe, prompt, controller, *controllers, seed=seed, steps=steps, guidance=guidance,
                          height=height, width=width, progress=progress)
        picture = result.images[0]
        settings = {"seed": seed, "steps": result.steps, "guidance": result.guidance, "real_image": False}
    else:
        picture, settings = _real_image_passes(pipe, prompt, image, [controller, *controllers], seed=seed,
                                               height=height, width=width, noise_level=noise_level,
                                               samples=samples)
    return ConceptMaps(concepts=concepts, maps=controller.maps(), image=picture, prompt=prompt,
                       layers=controller.layers, steps=sorted(controller.steps_seen),
                       settings={**settings, "blocks": list(controller.blocks)},
                       seconds=time.perf_counter() - start)


def _real_image_passes(pipe: Any, prompt: str, image: Any, controllers: list[Controller], *, seed: int,
                       height: int | None, width: int | None, noise_level: float, samples: int
                       ) -> tuple[Image.Image, dict[str, Any]]:
    """Encode ``image``, noise it to σ = ``noise_level`` and run ``samples`` transformer passes under
    ``controllers`` (step 0 of 1 each)."""
    import math

    from attnkit.flow_inversion import FlowVelocity, encode
    from attnkit.images import fit_image, load_image
    from attnkit.models import defaults_for
    from attnkit.threads import apply_threads

    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and 0.0 < noise_level <= 1.0):
        raise AttnkitError(f"noise_level={noise_level!r}: give the flow's noise level σ in (0, 1], e.g. 0.5")
    if not isinstance(samples, int) or samples < 1:
        raise AttnkitError(f"samples={samples!r}: give at least 1 noisy pass")
    d = defaults_for(pipe)
    height, width = height or d.height, width or d.width
    fitted, crop = fit_image(load_image(image), width, height)
    apply_threads()
    velocity = FlowVelocity(pipe, [prompt], 1.0, height, width)  # the conditional velocity alone
    x0 = encode(pipe, fitted).to(pipe.transformer.device)
    with control(pipe, *controllers, layout=velocity.layout) as ctl:
        for s in range(samples):
            noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed + s)).to(x0)
            ctl.set_step(0, 1)
            velocity((1.0 - noise_level) * x0 + noise_level * noise, float(noise_level))
    return fitted, {"real_image": True, "noise_level": float(noise_level), "samples": samples, "seed": seed,
                    "crop": crop.to_dict()}


__all__ = ["ConceptAttention", "ConceptMaps", "concept_maps", "default_blocks", "embed_concepts"]
