"""Prompt-to-Prompt in one call: a source prompt, a series of edited prompts, one shared noise, one batch.

    result = attnkit.edit(pipe, "a lemon cake", ["a chocolate cake", "a beet cake", "a lego cake"],
                          seed=8888, cross=0.8, self=0.4, blend=["cake"], reweight={"lego": 2.0})
    result.source.save("source.png"); result.edits[2].save("lego.png")
    result.word_maps(3)["lego"]            # the lego cake's cross-attention map of "lego"

The batch is ``[source, *targets]`` sampled together from one initial noise, so the source image is exactly
what plain generation of the source prompt gives (its rows are never edited).

Real images (inversion): pass the inverted starting latent as ``latents`` (one row, shared by every prompt)
and, for null-text inversion, the optimised unconditional embeddings as ``uncond_embeddings`` (one
``(1, L, D)`` tensor per step, or a ``(steps, 1, L, D)`` tensor): step 0's goes in as the pipeline's negative
prompt embedding, step ``i + 1``'s is swapped in after step ``i`` through ``callback_on_step_end``.
On SDXL the pooled unconditional embedding stays fixed over the steps: ``uncond_pooled`` ``(1, D)``, or
the pipeline's own when left out. They belong to the source row, which they steer back onto the inverted
trajectory; the edited rows keep the pipeline's own unconditional embedding (``target_uncond="pipeline"``,
as PnP Inversion does) or share the source's (``"inversion"``, the null-text paper's notebook). An embedding
tuned to reproduce the source's colours holds the edited rows back: on the bundled model, recoloured objects
keep their shape far better with the pipeline's own (``benchmarks/inversion.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from attnkit.adapters import text_tokenizer
from attnkit.controllers.p2p import CrossSchedule, LocalBlend, Refine, Replace, Reweight, Window
from attnkit.engine import AttnkitError, Controller
from attnkit.sampling import Generation, generate
from attnkit.store import AttentionStore

EditKind = Literal["auto", "replace", "refine"]
TargetUncond = Literal["pipeline", "inversion"]
TARGET_UNCONDS: tuple[str, ...] = ("pipeline", "inversion")


@dataclass
class EditResult:
    """What :func:`edit` returns: the images (source first), the maps of every prompt, the settings used."""

    images: list[Any]
    prompts: list[str]
    store: AttentionStore | None
    latents: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    generation: Generation | None = None
    blend_masks: torch.Tensor | None = None  # (prompts, h, w) bool: local blend's final masks, latent grid

    @property
    def source(self) -> Any:
        return self.images[0]

    @property
    def edits(self) -> list[Any]:
        return self.images[1:]

    def word_maps(self, index: int) -> dict[str, torch.Tensor]:
        """``{word: (H, W) map}`` of prompt ``index`` (0 = source), averaged over steps and layers."""
        if self.store is None:
            raise AttnkitError("this edit ran with maps=False: no attention maps were stored")
        return self.store.word_maps(self.prompts[index], row=index)

    def maps(self) -> list[dict[str, torch.Tensor]]:
        """Word maps of every prompt, source first."""
        return [self.word_maps(i) for i in range(len(self.prompts))]

    def record(self) -> dict[str, Any]:
        """A JSON-ready record of the edit (prompts, seed, schedules, blend, weights, ...)."""
        return {"prompts": self.prompts, **self.settings}


def _choose_kind(kind: str, source: str, targets: Sequence[str]) -> str:
    if kind not in ("auto", "replace", "refine"):
        raise AttnkitError(f"kind={kind!r}: use 'replace' (word swap), 'refine' (words added/removed) or 'auto'")
    if kind != "auto":
        return kind
    words = len(source.split())
    return "replace" if all(len(t.split()) == words for t in targets) else "refine"


def _uncond_list(uncond: Any, steps: int) -> list[torch.Tensor]:
    items = list(uncond.unbind(0)) if isinstance(uncond, torch.Tensor) else list(uncond)
    if len(items) != steps:
        raise AttnkitError(f"uncond_embeddings has {len(items)} entries for {steps} steps: pass one per step")
    return [e if e.dim() == 3 else e.unsqueeze(0) for e in items]


def _uncond_inputs(pipe: Any, source: str, batch: int, uncond_embeddings: Any, uncond_pooled: Any,
                   steps: int | None, controllers: list[Controller], target_uncond: TargetUncond
                   ) -> dict[str, torch.Tensor]:
    """Pipeline arguments for step 0's unconditional embeddings (+ SDXL's pooled ones): the given ones on the
    source row, and on the edited rows too unless ``target_uncond="pipeline"``; appends the controller that
    swaps in the later steps' embeddings."""
    from attnkit.inversion import UncondSchedule, encode_text, is_sdxl
    from attnkit.models import defaults_for

    if uncond_pooled is not None and not is_sdxl(pipe):
        raise AttnkitError("uncond_pooled is for SDXL pipelines only: leave it out on SD 1.x/2.x")
    defaults = defaults_for(pipe)
    embeds = _uncond_list(uncond_embeddings, int(steps or defaults.num_inference_steps))
    own = encode_text(pipe, source, defaults.height, defaults.width)  # the pipeline's own unconditional inputs
    shared = target_uncond == "inversion"
    rows = [embeds[0]] + [embeds[0] if shared else own.uncond.to(embeds[0])] * (batch - 1)
    extra = {"negative_prompt_embeds": torch.cat(rows)}
    if is_sdxl(pipe):
        pooled = (own.uncond_pooled if uncond_pooled is None else uncond_pooled)[:1].to(embeds[0])
        rows = [pooled] + [pooled if shared else own.uncond_pooled.to(pooled)] * (batch - 1)
        extra["negative_pooled_prompt_embeds"] = torch.cat(rows)
    controllers.append(UncondSchedule(embeds, rows=None if shared else 1))
    return extra


def build_controllers(tokenizer: Any, prompts: Sequence[str], *, kind: EditKind = "auto",
                      cross: CrossSchedule = 0.8, self: Window = 0.4, self_res: int | float = 16,  # noqa: A002
                      blend: Sequence[str] | Sequence[Sequence[str]] | None = None, blend_threshold: float = 0.3,
                      blend_start: float = 0.0, subtract: Sequence[str] | None = None,
                      subtract_threshold: float = 0.3, reweight: dict[str, float] | None = None,
                      blend_res: int | None = None) -> list[Controller]:
    """The controllers of one edit, in the order they must run: Replace/Refine, Reweight, LocalBlend.

    Every argument is validated here, before anything touches the pipeline.
    ``build_controllers(pipe.tokenizer, ["a lemon cake", "a lego cake"], reweight={"lego": 2.0})``
    """
    chosen = _choose_kind(kind, prompts[0], prompts[1:])
    edit_cls = Replace if chosen == "replace" else Refine
    controllers: list[Controller] = [edit_cls(prompts, tokenizer, cross_steps=cross, self_steps=self,
                                              self_res=self_res)]
    if reweight:
        controllers.append(Reweight(prompts, tokenizer, reweight, cross_steps=cross))
    if blend:
        controllers.append(LocalBlend(prompts, tokenizer, blend, threshold=blend_threshold, start=blend_start,
                                      subtract=subtract, subtract_threshold=subtract_threshold, res=blend_res))
    elif subtract:
        raise AttnkitError("subtract words need blend words too: pass blend=[...] with subtract=[...]")
    return controllers


def edit(pipe: Any, source: str, targets: str | Sequence[str], *, seed: int = 0, kind: EditKind = "auto",
         cross: CrossSchedule = 0.8, self: Window = 0.4, self_res: int | float = 16,  # noqa: A002
         blend: Sequence[str] | Sequence[Sequence[str]] | None = None, blend_threshold: float = 0.3,
         blend_start: float = 0.0, subtract: Sequence[str] | None = None, subtract_threshold: float = 0.3,
         blend_res: int | None = None, reweight: dict[str, float] | None = None, steps: int | None = None,
         guidance: float | None = None,
         height: int | None = None, width: int | None = None, maps: bool = True, maps_res: int | None = None,
         latents: torch.Tensor | None = None, uncond_embeddings: Any = None,
         uncond_pooled: torch.Tensor | None = None, target_uncond: TargetUncond = "pipeline",
         progress: bool = True) -> EditResult:
    """Edit the image of ``source`` into each of ``targets`` with Prompt-to-Prompt, in one batch.

    Usage: ``edit(pipe, "a lemon cake", ["a chocolate cake", "a lego cake"], seed=8888, blend=["cake"])``

    Args:
        kind: ``"replace"`` (word swap: same word count), ``"refine"`` (words added/removed) or ``"auto"``
            (replace when every target has the source's word count, else refine).
        cross: cross-attention replacement: a fraction ``0.8``, a ``(start, end)`` pair, or
            ``{"default_": 0.8, "word": 0.3}`` per word of the targets (see :func:`attnkit.controllers.cross_alpha`).
        self: self-attention replacement: a fraction or ``(start, end)``; ``self_res``: it touches grids of at
            most ``self_res²`` query pixels (the paper's 16: 16x16; a float in (0, 1) is a fraction of the latent
            side; :func:`attnkit.controllers.p2p.self_replaced`).
        blend: words whose region may change (local blend); everything else is kept from the source.
            ``blend_threshold``, ``blend_start`` (fraction of steps), ``subtract`` words whose region must stay
            (thresholded at ``subtract_threshold``), ``blend_res`` (grid).
        reweight: ``{word: factor}`` scaling the targets' attention to words (negative allowed).
        maps: store cross-attention maps of every prompt in the same pass (``maps_res``: one grid side, or
            ``None`` for all grids).
        latents: the starting latent (e.g. from inversion): one row, or one per prompt.
        uncond_embeddings: per-step unconditional embeddings (null-text inversion), see the module docstring.
        uncond_pooled: SDXL only: the pooled unconditional embedding that goes with them.
        target_uncond: the unconditional embedding of the edited rows when ``uncond_embeddings`` is given:
            the pipeline's own (``"pipeline"``) or the source's (``"inversion"``); see the module docstring.
    """
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list:
        raise AttnkitError("no target prompt given: pass at least one edited prompt")
    if target_uncond not in TARGET_UNCONDS:
        raise AttnkitError(f"target_uncond={target_uncond!r}: use 'pipeline' (the edited rows keep the "
                           "pipeline's own unconditional embedding) or 'inversion' (they share the source's)")
    prompts = [source, *target_list]
    controllers = build_controllers(text_tokenizer(pipe), prompts, kind=kind, cross=cross, self=self, self_res=self_res,
                                    blend=blend, blend_threshold=blend_threshold, blend_start=blend_start,
                                    subtract=subtract, subtract_threshold=subtract_threshold, reweight=reweight,
                                    blend_res=blend_res)
    store = AttentionStore(kinds=("cross",), res=maps_res) if maps else None
    if store is not None:
        controllers.append(store)  # last: it records the maps as edited
    extra: dict[str, Any] = {}
    if latents is not None:
        if latents.dim() != 4 or latents.shape[0] not in (1, len(prompts)):
            raise AttnkitError(f"latents must have shape (1 or {len(prompts)}, C, h, w), got {tuple(latents.shape)}")
        latents = latents.expand(len(prompts), -1, -1, -1).clone()
    if uncond_embeddings is not None:
        extra = _uncond_inputs(pipe, source, len(prompts), uncond_embeddings, uncond_pooled, steps, controllers,
                               target_uncond)
    elif uncond_pooled is not None:
        raise AttnkitError("uncond_pooled goes with uncond_embeddings: pass both (SDXL null-text inversion)")
    gen = generate(pipe, prompts, *controllers, seed=seed, steps=steps, guidance=guidance, height=height,
                   width=width, latents=latents, progress=progress, **extra)
    settings = {
        "kind": type(controllers[0]).__name__.lower(), "seed": seed, "steps": gen.steps, "guidance": gen.guidance,
        "height": gen.height, "width": gen.width, "cross": cross, "self": self, "self_res": self_res,
        "blend": blend, "blend_threshold": blend_threshold, "blend_start": blend_start, "subtract": subtract,
        "subtract_threshold": subtract_threshold, "blend_res": blend_res, "reweight": reweight,
        "inverted_latents": latents is not None,
        "null_text": uncond_embeddings is not None,
        "target_uncond": target_uncond if uncond_embeddings is not None else None, "seconds": round(gen.seconds, 3),
    }
    blends = [c for c in controllers if isinstance(c, LocalBlend) and c.last_mask is not None]
    masks = blends[0].last_mask[:, 0].cpu() if blends else None
    return EditResult(images=gen.images, prompts=prompts, store=store, latents=gen.latents, settings=settings,
                      generation=gen, blend_masks=masks)
