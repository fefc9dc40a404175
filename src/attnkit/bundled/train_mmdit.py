"""Train attnkit's bundled MM-DiT model: the shapes world on a Stable Diffusion 3 transformer, on a CPU.

The UNet model's pieces are reused (:mod:`attnkit.bundled.train`): its VAE (frozen; latents encoded once into
``run_dir/data``), its tokenizer, its scenes and grammar v2 captions, its grounding targets and loss, EMA, the
data order, the checker evaluation and the atomic export. What is new here:

- the denoiser is an ``SD3Transformer2DModel`` (patch size 1 on the 16x16x4 latent: 256 image tokens, a 16x16
  grid of image→text maps), trained with SD3's rectified-flow objective: ``x_t = (1 - σ) x0 + σ ε``, target
  ``ε - x0``, ``σ`` logit-normal (m 0, s 1), timestep ``1000 σ``;
- the two CLIP text encoders SD3 requires start from the UNet model's trained text encoder (same tokenizer), so
  the text stream means something from step 0, and are trained jointly; there is no T5 encoder
  (``text_encoder_3=None``: the pipeline appends ``max_sequence_length`` zero embeddings instead);
- those zero embeddings are identical tokens (SD3 gives text no positions), so ``n`` of them act exactly as one
  token whose attention logit is raised by ``log n``: training runs one stand-in token (n = 256, the pipeline's
  default, or n = 0, i.e. ``max_sequence_length=0``, half the batch each) through :class:`_JointProcessor`, 3x
  faster than 256 real ones; ``tests/bundled/test_train_mmdit.py`` checks it against the stock processor;
- the grounding loss reads the image→text attention of every joint block, renormalised over the text columns
  as attnkit's SD3 adapter offers it to controllers (the "cross" view), restricted to the CLIP tokens.

Usage::

    python -m attnkit.bundled.train_mmdit --run-dir runs/mmdit --minutes 90
    # or: attnkit train-bundled --family mmdit --run-dir runs/mmdit --minutes 90

Resumable (``run_dir/ckpt``: weights, EMA and AdamW moments as safetensors, the rest in ``state.json``; no
pickles), seeded, stops at a wall-clock budget; every ``eval_every_min`` the EMA weights are scored and, when
better, exported as a ``StableDiffusion3Pipeline`` folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import evaluate as _evaluate  # noqa: F401  (imported now: a run of hours must not pick up later edits)
from . import train as base
from .scenes import SIZE

BUNDLED_UNET_MODEL = Path(__file__).resolve().parent / "model"
DEFAULT_EXPORT = Path(__file__).resolve().parent / "mmdit"
T5_COPIES = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero embeddings without T5
TEXT_DIM = 128  # per CLIP encoder (the UNet model's); SD3 concatenates the two: 256 features
TRANSFORMER_CONFIGS: dict[str, dict] = {
    # hidden = heads x 32; 4-6 joint blocks: one training step must stay fast on one CPU core
    "s": {"num_layers": 4, "num_attention_heads": 4},
    "m": {"num_layers": 5, "num_attention_heads": 4},
    "l": {"num_layers": 6, "num_attention_heads": 6},
}
HEAD_DIM = 32
NO_T5 = {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}  # model_index.json: loads without T5
# Sampled without the zero T5 tokens: 288 instead of 544 tokens, 2-3x faster (trained with both)
CALL_DEFAULTS = {"max_sequence_length": 0}
SHIFT = 1.0  # flow-matching sigma shift: SD3 uses 3.0 at 128x128 latents; 16x16 needs none


# ------------------------------------------------------------------------------------------ model


def make_transformer(size: str = "m"):
    from diffusers import SD3Transformer2DModel

    c = TRANSFORMER_CONFIGS[size]
    hidden = c["num_attention_heads"] * HEAD_DIM
    return SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=c["num_layers"],
        attention_head_dim=HEAD_DIM, num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=hidden, pooled_projection_dim=2 * TEXT_DIM,
        pos_embed_max_size=16, qk_norm="rms_norm",  # SD3.5's q/k RMS norms: stable at a from-scratch lr
    )


def make_text_encoders(init: Path | None = BUNDLED_UNET_MODEL / "text_encoder"):
    """SD3's two CLIP encoders (``CLIPTextModelWithProjection``), both initialised from the UNet model's text
    encoder (the projection is new). ``init=None``: random (tests)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig.from_pretrained(BUNDLED_UNET_MODEL / "text_encoder" if init is None else init)
    cfg.architectures = ["CLIPTextModelWithProjection"]
    trained = None if init is None else CLIPTextModel.from_pretrained(init).state_dict()
    out = []
    for _ in range(2):
        te = CLIPTextModelWithProjection(cfg)
        if trained is not None:
            te.text_model.load_state_dict(trained)  # strict: every tensor but the new projection
        out.append(te)
    return out


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def build_pipeline(vae, text_encoders, tok, transformer):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(), vae=vae, text_encoder=text_encoders[0],
        tokenizer=tok, text_encoder_2=text_encoders[1], tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def encode_text(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes from the CLIP encoders: penultimate hidden
    states concatenated over features ``(B, 32, 256)`` and the pooled projections ``(B, 256)``."""
    seq, pooled = [], []
    for te in text_encoders:
        o = te(ids, output_hidden_states=True)
        seq.append(o.hidden_states[-2])
        pooled.append(o.text_embeds)
    return torch.cat(seq, -1), torch.cat(pooled, -1)


class _JointProcessor:
    """``JointAttnProcessor2_0`` where the last text token stands for ``copies[b]`` identical tokens: its logit
    is raised by ``log copies`` (``-inf`` for 0). With ``tap`` set, appends each call's image→text attention,
    renormalised over the text columns and averaged over heads, of the first ``clip_tokens`` text tokens:
    ``(B, image tokens, clip_tokens)`` with gradients."""

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None  # (B, 1, 1, 1): log copies of the stand-in token
        self.tap: list[torch.Tensor] | None = None
        self.clip_tokens = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        n_img, n_txt = q.shape[2], cq.shape[2]
        bias = torch.zeros(b, 1, 1, n_img + n_txt, dtype=q.dtype)
        bias[..., -1:] = self.bias
        if self.tap is not None:
            scores = torch.matmul(q, ck.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias[..., n_img:]
            self.tap.append(scores.softmax(-1).mean(1)[..., : self.clip_tokens])
        out = F.scaled_dot_product_attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2),
                                             attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


def install_processor(transformer) -> _JointProcessor:
    proc = _JointProcessor()
    transformer.set_attn_processor(proc)
    return proc


def restore_processor(transformer) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())


def forward(transformer, proc: _JointProcessor, x: torch.Tensor, sigma: torch.Tensor, seq: torch.Tensor,
            pooled: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for latents ``x`` at ``sigma`` with ``copies[b]`` zero T5 tokens after the
    CLIP tokens (``_JointProcessor`` must be installed)."""
    stand_in = torch.zeros(seq.shape[0], 1, seq.shape[-1], dtype=seq.dtype)
    log_copies = torch.where(copies > 0, copies.float().clamp(min=1).log(), torch.tensor(float("-inf")))
    proc.bias = log_copies.view(-1, 1, 1, 1).to(x.dtype)
    return transformer(x, torch.cat([seq, stand_in], 1), pooled, sigma * 1000).sample


# ------------------------------------------------------------------------------------ run folder


def prepare_run_dir(run_dir: Path, n_scenes: int, source: Path = BUNDLED_UNET_MODEL) -> None:
    """Copy the UNet model's VAE (``shift_factor`` 0.0: SD3's decode adds it) and tokenizer into ``run_dir``,
    then encode the training scenes with that VAE (:func:`attnkit.bundled.train.encode_scenes`)."""
    from diffusers import AutoencoderKL

    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(source / "vae")
        vae.register_to_config(shift_factor=0.0)
        vae.save_pretrained(run_dir / "vae.tmp")
        os.replace(run_dir / "vae.tmp", run_dir / "vae")
    if not (run_dir / "tokenizer").exists():
        shutil.copytree(source / "tokenizer", run_dir / "tokenizer.tmp")
        os.replace(run_dir / "tokenizer.tmp", run_dir / "tokenizer")
    base.encode_scenes(run_dir, n_scenes)


# ------------------------------------------------------------------------------------ checkpoints


def _save_ckpt(run_dir: Path, names, params, ema, opt, state: dict) -> None:
    from safetensors.torch import save_file

    ck = run_dir / "ckpt"
    ck.mkdir(exist_ok=True)
    moments = {}
    for name, p in zip(names, params, strict=True):
        st = opt.state.get(p)
        if st:
            moments[f"{name}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            moments[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    files = {"weights": {n: p.detach().contiguous() for n, p in zip(names, params, strict=True)},
             "ema": {n: q.contiguous() for n, q in zip(names, ema, strict=True)}, "adam": moments}
    for stem, tensors in files.items():
        save_file(tensors, ck / f"{stem}.tmp")
    (ck / "state.tmp").write_text(json.dumps(state, indent=1))
    for stem in files:
        os.replace(ck / f"{stem}.tmp", ck / f"{stem}.safetensors")
    os.replace(ck / "state.tmp", ck / "state.json")


def _load_ckpt(run_dir: Path, names, params, ema, opt) -> dict:
    from safetensors.torch import load_file

    ck = run_dir / "ckpt"
    w, e, m = (load_file(ck / f"{s}.safetensors") for s in ("weights", "ema", "adam"))
    with torch.no_grad():
        for name, p, q in zip(names, params, ema, strict=True):
            p.copy_(w[name])
            q.copy_(e[name])
            if f"{name}.exp_avg" in m:
                opt.state[p] = {"step": m[f"{name}.step"].reshape(()).clone(), "exp_avg": m[f"{name}.exp_avg"],
                                "exp_avg_sq": m[f"{name}.exp_avg_sq"]}
    return json.loads((ck / "state.json").read_text())


# ------------------------------------------------------------------------------------------ train


def train_mmdit(
    run_dir: Path,
    minutes: float,
    n_scenes: int,
    size: str = "m",
    batch: int = 32,
    lr: float = 8e-4,
    seed: int = 0,
    eval_every_min: float = 15.0,
    eval_n: int = 32,
    guidances: tuple[float, ...] = (2.0, 4.0),
    steps: int = 20,
    export_dir: Path = DEFAULT_EXPORT,
    ground_weight: float = 0.1,
    open_rates: tuple[float, float] = (0.2, 0.25),
    text_init: Path | None = BUNDLED_UNET_MODEL / "text_encoder",
    warmup: int = 200,
) -> None:
    """Train the SD3 transformer and both text encoders on the pre-encoded latents for ``minutes``
    (resumable; ``run_dir`` prepared by :func:`prepare_run_dir`). ``steps``: sampling steps of the evaluation
    and the exported default; ``ground_weight``: weight of the grounding loss; ``open_rates``: grammar v2's
    (colour, background) open rates (the shipped UNet model's: 0.2, 0.25)."""
    tok = base.get_tokenizer(run_dir)
    vae = base.load_vae(run_dir)
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    latents, ids = base.load_latents(run_dir, n_scenes, open_rates)
    n_data = len(latents)
    empty_ids = base.tokenize(tok, [""])[0]
    torch.manual_seed(seed)
    transformer = make_transformer(size)
    text_encoders = make_text_encoders(text_init)
    modules = {"transformer": transformer, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]}
    names = [f"{m}.{k}" for m, mod in modules.items() for k, _ in mod.named_parameters()]
    params = [p for mod in modules.values() for p in mod.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    state = {"step": 0, "total_steps": None, "best": -1.0, "seconds": 0.0, "samples": 0, "history": []}
    if (run_dir / "ckpt" / "state.json").exists():
        state = _load_ckpt(run_dir, names, params, ema, opt)
        base.log(run_dir, f"mmdit: resumed at step {state['step']}")
    proc = install_processor(transformer)
    proc.clip_tokens = tok.model_max_length
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for te in text_encoders for p in te.parameters())
    base.log(run_dir, f"mmdit[{size}]: transformer {n_tr / 1e6:.2f}M params, text encoders {n_te / 1e6:.2f}M, "
                      f"data {n_data}, batch {batch}, lr {lr}, ground {ground_weight}, {minutes:.1f} min")
    info_common = {"transformer_size": size, "n_scenes": n_data, "batch": batch, "lr": lr, "seed": seed,
                   "ground_weight": ground_weight, "open_color_rate": open_rates[0],
                   "open_background_rate": open_rates[1], "objective": "rectified flow, logit-normal sigma",
                   "t5_copies_trained": [0, T5_COPIES]}

    def evaluate_and_export() -> None:
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, q in zip(params, ema, strict=True):
                p.copy_(q)
        for mod in modules.values():
            mod.eval()
        restore_processor(transformer)
        try:
            pipe = build_pipeline(vae, text_encoders, tok, transformer)
            pipe.set_progress_bar_config(disable=True)
            results = {g: base.quick_eval(pipe, eval_n, g, steps=steps, open_n=eval_n // 2 if any(open_rates) else 0,
                                          call_kwargs=CALL_DEFAULTS) for g in guidances}
            best_g = max(results, key=lambda g: results[g]["mean"])
            state["history"].append({"step": state["step"], "samples": state["samples"],
                                     "minutes": state["seconds"] / 60, **{f"g{g}": r for g, r in results.items()}})
            base.log(run_dir, f"eval step {state['step']}: " + "; ".join(
                f"g={g}: " + " ".join(f"{k} {v:.2f}" for k, v in r.items()) for g, r in results.items()))
            if results[best_g]["mean"] > state["best"]:
                state["best"] = results[best_g]["mean"]
                defaults = {"guidance_scale": best_g, "num_inference_steps": steps, "height": SIZE, "width": SIZE,
                            **CALL_DEFAULTS}
                info = {"step": state["step"], "samples_seen": state["samples"],
                        "train_minutes": state["seconds"] / 60, "eval": results, **info_common}
                base.export_model(pipe, export_dir, defaults, info, index_extra=NO_T5)
                base.log(run_dir, f"exported to {export_dir} (mean {state['best']:.3f}, guidance {best_g})")
        except Exception as exc:  # an evaluation bug must not kill hours of training
            import traceback

            base.log(run_dir, f"eval/export failed: {exc!r}\n{traceback.format_exc()}")
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)
            transformer.set_attn_processor(proc)
            for mod in modules.values():
                mod.train()

    t_start = time.time()
    end = t_start + minutes * 60
    last_eval = last_ckpt = time.time()
    for mod in modules.values():
        mod.train()
    losses: list[float] = []
    ground_losses: list[float] = []
    t_log = time.time()
    while time.time() < end:
        step = state["step"]
        if state["total_steps"] is None and step >= 30:
            # fix the cosine length once the speed is known: the steps that fit the budget (less evaluation)
            state["total_steps"] = int(step / max(state["seconds"], 1e-6) * minutes * 60 * 0.85)
            base.log(run_dir, f"mmdit: total_steps set to {state['total_steps']}")
        frac = min(1.0, step / (state["total_steps"] or 10**9))
        cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = base.batch_indices(step, batch, n_data, seed)
        x0 = (latents[idx].float() - shift) * sf
        tids = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # caption dropout -> classifier-free guidance
        tids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # SD3's logit-normal (0, 1)
        copies = torch.where(torch.rand(batch, generator=gen) < 0.5, T5_COPIES, 0)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        seq, pooled = encode_text(text_encoders, tids)
        proc.tap = [] if ground_weight > 0 else None
        pred = forward(transformer, proc, xt, sigma, seq, pooled, copies)
        mse = F.mse_loss(pred, noise - x0)
        loss = mse
        if ground_weight > 0:
            targets = base.grounding_targets(tok, idx.tolist(), drop, open_rates, resolutions=(16,))
            g_loss = base.grounding_loss(proc.tap, targets)
            loss = mse + ground_weight * g_loss
            ground_losses.append(g_loss.item())
        proc.tap = None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        base._ema_update(ema, params, min(0.999, (1 + step) / (10 + step)))
        state["step"] = step + 1
        state["samples"] += batch
        losses.append(mse.item())
        now = time.time()
        state["seconds"] += now - t_log
        t_log = now
        if state["step"] % 25 == 0:
            state["last_loss"] = float(np.mean(losses[-25:]))
            grounding = f" grounding {np.mean(ground_losses[-25:]):.4f}" if ground_losses else ""
            base.log(run_dir, f"step {state['step']} loss {state['last_loss']:.4f}{grounding} lr {cur_lr:.2e} "
                              f"{state['samples'] / max(state['seconds'], 1e-6):.1f} samples/s, "
                              f"{state['samples']} seen")
        if now - last_ckpt > 300:
            _save_ckpt(run_dir, names, params, ema, opt, state)
            last_ckpt = now
        if now - last_eval > eval_every_min * 60:
            evaluate_and_export()
            _save_ckpt(run_dir, names, params, ema, opt, state)
            last_eval = last_ckpt = t_log = time.time()
    if ground_losses:
        state["last_grounding"] = float(np.mean(ground_losses[-25:]))
    evaluate_and_export()
    _save_ckpt(run_dir, names, params, ema, opt, state)
    restore_processor(transformer)
    base.log(run_dir, f"mmdit: stopped at step {state['step']} ({state['samples']} samples, "
                      f"{state['seconds'] / 60:.1f} train min), best eval mean {state['best']:.3f}")


def train(run_dir: str | Path = "runs/mmdit", minutes: float = 90.0, n_scenes: int = 60_000, size: str = "m",
          batch: int = 32, lr: float = 8e-4, seed: int = 0, export_dir: str | Path | None = None,
          end_at: float | None = None, ground_weight: float = 0.1, open_color_rate: float = 0.2,
          open_background_rate: float = 0.25, eval_every_min: float = 15.0,
          guidances: tuple[float, ...] = (2.0, 4.0), eval_n: int = 32) -> None:
    """Prepare ``run_dir`` (VAE, tokenizer, encoded scenes) and train. Usage: ``train("runs/mmdit", minutes=90)``;
    with ``end_at`` (a unix time) training stops then instead. ``export_dir`` defaults to ``run_dir/model``."""
    torch.set_num_threads(1)  # one thread: the shared 2-core box is several times slower with two
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, n_scenes)
    if end_at is not None:
        minutes = (end_at - time.time()) / 60
    train_mmdit(run_dir, minutes, n_scenes, size=size, batch=batch, lr=lr, seed=seed,
                export_dir=Path(export_dir) if export_dir else run_dir / "model", ground_weight=ground_weight,
                open_rates=(open_color_rate, open_background_rate), eval_every_min=eval_every_min,
                guidances=tuple(guidances), eval_n=eval_n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train attnkit's bundled MM-DiT (SD3) shapes-world model (CPU).")
    p.add_argument("--run-dir", default="runs/mmdit")
    p.add_argument("--minutes", type=float, default=90.0)
    p.add_argument("--end-at", type=float, default=None, help="unix time at which training stops")
    p.add_argument("--n-scenes", type=int, default=60_000)
    p.add_argument("--size", default="m", choices=sorted(TRANSFORMER_CONFIGS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-dir", default=None, help="default: RUN_DIR/model")
    p.add_argument("--ground-weight", type=float, default=0.1)
    p.add_argument("--open-color-rate", type=float, default=0.2)
    p.add_argument("--open-background-rate", type=float, default=0.25)
    p.add_argument("--eval-every-min", type=float, default=15.0)
    p.add_argument("--guidances", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--eval-n", type=int, default=32, help="held-out prompts per evaluation (+ half as many open)")
    a = p.parse_args(argv)
    train(a.run_dir, a.minutes, a.n_scenes, a.size, a.batch, a.lr, a.seed, a.export_dir, a.end_at, a.ground_weight,
          a.open_color_rate, a.open_background_rate, a.eval_every_min, tuple(a.guidances), a.eval_n)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
