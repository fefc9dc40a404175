"""Stable Flow (Avrahami et al., CVPR 2025): vital layers, and editing by injecting attention in them.

    vital = attnkit.vital_layers(pipe, ["a red circle on a white background"])   # blocks ranked by impact
    result = attnkit.stable_flow_edit(pipe, "a red circle", ["a red circle and a blue square"],
                                      layers=vital.top())
    result.edits[0]

**Vital layers.** Each transformer block is bypassed in turn (its output is its input, through a forward hook
that is always removed again) and the images of a few prompts are regenerated from the same seeds; a block is
vital when bypassing it changes the image a lot. The paper measures the change with DINOv2 perceptual
similarity; attnkit needs no downloaded network, so its default ``metric="pixel"`` is the root-mean-square
difference of the decoded images (values in [0, 1]): bypassing a vital block changes the layout and the
objects, which moves many pixels, while bypassing an unimportant one leaves the picture nearly as it was.
``metric="latent"`` compares the final latents instead; any ``metric(a, b) -> float`` on two PIL images
(e.g. ``1 − DINO cosine``) can be passed. The paper's FLUX.1-dev result, 4 double blocks (0, 1, 17, 18) and
5 single blocks (6, 9, 34, 35, 37) of 57, is the default share of :meth:`VitalLayers.top` (9/57).

**Editing.** The batch ``[source, *edits]`` is generated from one noise with
:class:`~attnkit.controllers.stable_flow.StableFlowInjection` in the vital layers: every edit row attends with
its own queries to the source row's image keys and values there, so it keeps the source's identity and layout
while its prompt changes what the text asks for. Real images (``image=``): the encoded latents are "nudged" by
1.15 (the paper's latent nudging: the inversion becomes more stable a little off the data manifold), inverted
with Euler steps at guidance 1, and the source row is put back on the inverted trajectory after every step;
the edit rows use the model's guidance (the official code's ``[1] + [3] * n``). The final latents are divided
by the nudge before decoding, so the source row decodes to the encoded image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnkit.controllers.stable_flow import StableFlowInjection
from attnkit.engine import AttnkitError, Controller

NUDGE = 1.15  # the paper's latent nudging factor
PAPER_VITAL = ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.17", "transformer_blocks.18",
               "single_transformer_blocks.6", "single_transformer_blocks.9", "single_transformer_blocks.34",
               "single_transformer_blocks.35", "single_transformer_blocks.37")  # FLUX.1-dev, official code
PAPER_SHARE = len(PAPER_VITAL) / 57  # of FLUX.1-dev's 19 + 38 blocks
Metric = Callable[[Image.Image, Image.Image], float]


@dataclass
class VitalLayers:
    """What :func:`vital_layers` returns: ``scores`` (block name → mean change when it is bypassed, larger =
    more vital), ``ranked`` (names, most vital first) and how it was measured."""

    scores: dict[str, float]
    metric: str
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ranked(self) -> list[str]:
        return sorted(self.scores, key=lambda name: -self.scores[name])

    def top(self, k: int | None = None) -> list[str]:
        """The ``k`` most vital blocks in forward order (default: the paper's share, 9 of 57 blocks, at least 1)."""
        count = max(1, round(PAPER_SHARE * len(self.scores))) if k is None else int(k)
        if not 1 <= count <= len(self.scores):
            raise AttnkitError(f"k={k}: choose between 1 and {len(self.scores)} blocks")
        order = list(self.scores)
        return sorted(self.ranked[:count], key=order.index)

    def record(self) -> dict[str, Any]:
        return {"method": "vital-layers", "metric": self.metric, "prompts": self.prompts, "seeds": self.seeds,
                "scores": {k: round(v, 6) for k, v in self.scores.items()}, "ranked": self.ranked,
                **self.settings, "seconds": round(self.seconds, 3)}


def _distance(metric: str | Metric) -> tuple[str, Callable[[Any, Any, Any, Any], float]]:
    """(name, f(image_a, image_b, latents_a, latents_b))."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), lambda a, b, la, lb: float(metric(a, b))
    if metric == "pixel":
        def pixel(a: Image.Image, b: Image.Image, la: Any, lb: Any) -> float:
            x = np.asarray(a.convert("RGB"), dtype=np.float64) / 255.0
            y = np.asarray(b.convert("RGB"), dtype=np.float64) / 255.0
            return float(np.sqrt(((x - y) ** 2).mean()))
        return "pixel", pixel
    if metric == "latent":
        return "latent", lambda a, b, la, lb: float((la.float() - lb.float()).pow(2).mean().sqrt())
    raise AttnkitError(f"unknown metric {metric!r}: use 'pixel', 'latent' or a function(image_a, image_b) -> "
                       "distance")


def vital_layers(pipe: Any, prompts: str | Sequence[str], *, seeds: Sequence[int] = (0,),
                 blocks: Sequence[str] | None = None, metric: str | Metric = "pixel", steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 progress: bool = True) -> VitalLayers:
    """Rank the transformer's blocks by how much bypassing each one changes the generated images.

    Usage: ``attnkit.vital_layers(pipe, ["a red circle", "a blue square"], seeds=[0, 1]).top()``

    Every prompt is generated from every seed once as is and once per bypassed block (``blocks``: names of
    :meth:`Adapter.blocks`, default all), with ``steps``/``guidance``/size as :func:`attnkit.generate`; the
    score of a block is the mean ``metric`` distance to the unbypassed images (see the module docstring).
    """
    from attnkit.adapters import adapter_for
    from attnkit.adapters.joint import bypass_block
    from attnkit.sampling import generate, normalize_prompts

    prompt_list = normalize_prompts(prompts if isinstance(prompts, str) else list(prompts))
    seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise AttnkitError("no seeds given: pass at least one, e.g. seeds=[0]")
    name, distance = _distance(metric)
    available = adapter_for(pipe).blocks()
    chosen = list(available) if blocks is None else list(blocks)
    for b in chosen:
        if b not in available:
            raise AttnkitError(f"{b!r} is not a block of this transformer; its blocks are {', '.join(available)}")
    if not chosen:
        raise AttnkitError("no blocks to bypass: pass block names or None for all")
    start = time.perf_counter()
    kwargs = dict(steps=steps, guidance=guidance, height=height, width=width, progress=False)

    def run_all() -> list[tuple[list[Image.Image], torch.Tensor]]:
        return [(r.images, r.latents) for r in (generate(pipe, prompt_list, seed=s, **kwargs) for s in seed_list)]

    reference = run_all()
    scores: dict[str, float] = {}
    from tqdm.auto import tqdm

    for block_name in tqdm(chosen, desc="vital layers", disable=not progress, leave=False):
        with bypass_block(available[block_name]):
            changed = run_all()
        values = [distance(a, b, la[i], lb[i])
                  for (images_a, la), (images_b, lb) in zip(reference, changed, strict=True)
                  for i, (a, b) in enumerate(zip(images_a, images_b, strict=True))]
        scores[block_name] = float(np.mean(values))
    return VitalLayers(scores=scores, metric=name, prompts=prompt_list, seeds=seed_list,
                       settings={"steps": steps, "guidance": guidance}, seconds=time.perf_counter() - start)


@dataclass
class StableFlowResult:
    """What :func:`stable_flow_edit` returns: ``images`` in prompt order (the source first), the prompts and the
    blocks injected into."""

    images: list[Image.Image]
    prompts: list[str]
    layers: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def source(self) -> Image.Image:
        return self.images[0]

    @property
    def edits(self) -> list[Image.Image]:
        return self.images[1:]

    def record(self) -> dict[str, Any]:
        return {"method": "stable-flow", "prompts": self.prompts, "layers": self.layers, **self.settings,
                "seconds": round(self.seconds, 3)}


def stable_flow_edit(pipe: Any, source_prompt: str, edit_prompts: str | Sequence[str], *controllers: Controller,
                     layers: Sequence[str | int] | VitalLayers | None = None, image: Any = None, seed: int = 0,
                     steps: int | None = None, guidance: float | None = None, height: int | None = None,
                     width: int | None = None, nudge: float = NUDGE, progress: bool = True) -> StableFlowResult:
    """Edit the image of ``source_prompt`` (generated from ``seed``, or a real ``image``) towards each of
    ``edit_prompts`` with Stable Flow's injection in ``layers``.

    Usage: ``attnkit.stable_flow_edit(pipe, "a cat", ["a cat wearing a hat"], layers=vital.top()).edits[0]``

    ``layers``: block names or indices, a :class:`VitalLayers` (its :meth:`~VitalLayers.top`), or None: the
    vital layers measured here first on the source prompt (one generation per block; pass them in when you
    edit more than once). ``controllers`` (a store) run in the same pass. ``nudge``: the real-image latent
    scaling (1.15).
    """
    from attnkit.sampling import generate, normalize_prompts

    if not isinstance(source_prompt, str) or not source_prompt.strip():
        raise AttnkitError("the source prompt is empty: describe the image to edit")
    targets = [edit_prompts] if isinstance(edit_prompts, str) else list(edit_prompts)
    if not targets:
        raise AttnkitError("no edit prompt given: pass at least one edited caption")
    prompts = normalize_prompts([source_prompt, *targets])
    if not (isinstance(nudge, (int, float)) and math.isfinite(nudge) and nudge > 0):
        raise AttnkitError(f"nudge={nudge!r}: give a positive latent scale such as 1.15")
    start = time.perf_counter()
    if layers is None:
        layers = vital_layers(pipe, [source_prompt], seeds=[seed], steps=steps, guidance=guidance, height=height,
                              width=width, progress=progress)
    chosen = layers.top() if isinstance(layers, VitalLayers) else list(layers)
    inject = StableFlowInjection(chosen)
    if image is None:
        result = generate(pipe, prompts, inject, *controllers, seed=seed, steps=steps, guidance=guidance,
                          height=height, width=width, progress=progress)
        images = result.images
        settings: dict[str, Any] = {"seed": seed, "steps": result.steps, "guidance": result.guidance,
                                    "real_image": False}
    else:
        images, settings = _edit_real(pipe, image, prompts, [inject, *controllers], steps=steps, guidance=guidance,
                                      height=height, width=width, nudge=float(nudge), progress=progress)
    return StableFlowResult(images=images, prompts=prompts, layers=sorted(inject.blocks, key=_order(chosen)),
                            settings=settings, seconds=time.perf_counter() - start)


def _order(chosen: list) -> Callable[[str], Any]:
    names = [c for c in chosen if isinstance(c, str)]
    return lambda name: (names.index(name) if name in names else len(names), name)


def nudged_inversion(pipe: Any, image: Any, prompt: str, *, steps: int | None = None, height: int | None = None,
                     width: int | None = None, nudge: float = NUDGE, progress: bool = True) -> Any:
    """Stable Flow's inversion: the encoded image × ``nudge``, then Euler steps from σ = 0 to 1 at guidance 1
    (the conditional velocity alone). Returns an :class:`attnkit.FlowInversion` (``rf_edit`` regenerates it)."""
    from attnkit.engine import control
    from attnkit.flow_inversion import FlowInversion, FlowVelocity, encode, schedule, solve
    from attnkit.images import fit_image, load_image
    from attnkit.models import defaults_for
    from attnkit.settings import check_steps
    from attnkit.threads import apply_threads

    d = defaults_for(pipe)
    steps = check_steps(d.num_inference_steps if steps is None else steps)
    height, width = height or d.height, width or d.width
    fitted, crop = fit_image(load_image(image), width, height)
    apply_threads()
    start = time.perf_counter()
    sigmas = schedule(pipe, steps, height, width)
    velocity = FlowVelocity(pipe, [prompt], 1.0, height, width)
    x0 = encode(pipe, fitted).to(pipe.transformer.device) * nudge
    with control(pipe, layout=velocity.layout) as ctl:
        def start_step(i: int) -> None:
            ctl.set_step(steps - 1 - i, steps)

        _, path = solve(velocity, x0, sigmas[::-1], "euler", step_start=start_step)
    return FlowInversion(prompt=prompt, solver="euler", sigmas=sigmas, latents=torch.cat(path).float().cpu(),
                         guidance=1.0, evaluations=velocity.calls, crop=crop, image=fitted,
                         seconds=time.perf_counter() - start)


def _edit_real(pipe: Any, image: Any, prompts: list[str], controllers: list[Controller], *, steps: int | None,
               guidance: float | None, height: int | None, width: int | None, nudge: float, progress: bool
               ) -> tuple[list[Image.Image], dict[str, Any]]:
    from attnkit.flow_inversion import rf_generate
    from attnkit.models import defaults_for
    from attnkit.sampling import decode_latents
    from attnkit.settings import check_guidance

    edit_guidance = check_guidance(defaults_for(pipe).guidance_scale if guidance is None else guidance)
    inversion = nudged_inversion(pipe, image, prompts[0], steps=steps, height=height, width=width, nudge=nudge,
                                 progress=progress)
    result = rf_generate(pipe, inversion, prompts, *controllers, solver="euler",
                         guidance=[1.0] + [edit_guidance] * (len(prompts) - 1), follow_source=True,
                         progress=progress)
    images = decode_latents(pipe, (result.latents / nudge).to(pipe.transformer.device, pipe.vae.dtype))
    return images, {"real_image": True, "steps": inversion.steps, "guidance": edit_guidance, "nudge": nudge,
                    "crop": inversion.crop.to_dict()}


__all__ = ["NUDGE", "PAPER_VITAL", "StableFlowInjection", "StableFlowResult", "VitalLayers", "nudged_inversion",
           "stable_flow_edit", "vital_layers"]
