"""Tiny random pipelines built from config dicts, for tests and benchmarks (no download needed).

    pipe = tiny_pipeline("sd")            # SD1.x-like: 2 resolutions, self- and cross-attention
    pipe = tiny_pipeline("sdxl")          # SDXL-like: text_embeds + time_ids conditioning, 2 text encoders
    pipe = tiny_pipeline("sd3")           # SD3.5-like MM-DiT: CLIP-L/G + T5, joint and dual attention, q/k norms
    pipe = tiny_pipeline("flux")          # FLUX.1-like MM-DiT: double and single stream, RoPE, guidance embedding

The CLIP tokenizer is a real byte-level BPE ``CLIPTokenizer`` built locally: every text tokenizes (unknown
words split into byte tokens), and the words in :data:`TEST_WORDS` are single tokens. The T5 tokenizer is a
real sentencepiece-style (Unigram) ``T5Tokenizer`` built locally the same way (:func:`build_t5_tokenizer`).
Transformer pipelines sample at 32x32 pixels by default (an 8x8 grid of image tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from attnkit.bundled.tokenizer import bytes_to_unicode

TEST_WORDS = (
    "a an the of on in with and photo picture painting drawing cake lemon chocolate lego beet cat dog "
    "sunglasses wearing red blue green yellow purple circle square triangle background white black "
    "castle bird tree house car sitting field mountain sky"
).split()


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77, keep_split: Iterable[str] = ()) -> Any:
    """A byte-level BPE ``CLIPTokenizer`` in which each of ``words`` is one token.

    Words in ``keep_split`` get merges only up to two halves, so they stay two tokens (to exercise
    multi-token words). ``tokenizer = build_clip_tokenizer(["red", "circle"], model_max_length=24)``
    """
    from transformers import CLIPTokenizer

    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in base + [c + "</w>" for c in base]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    split = set(keep_split)

    def segment(symbols: list[str]) -> list[str]:
        # Apply the merges learnt so far, lowest rank first, exactly as BPE does at tokenization time.
        while len(symbols) > 1:
            pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
        return symbols

    def join(symbols: list[str]) -> None:
        # New merges go last, so they never pre-empt a merge another word relies on.
        parts = segment(symbols)
        current = parts[0]
        for part in parts[1:]:
            ranks.setdefault((current, part), len(ranks))
            current += part
            vocab.setdefault(current, len(vocab))

    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        if word in split and len(symbols) >= 4:
            join(symbols[: len(symbols) // 2])
            join(symbols[len(symbols) // 2 :])
        else:
            join(symbols)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: Iterable[str], model_max_length: int = 512, keep_split: Iterable[str] = ()) -> Any:
    """A sentencepiece-style (Unigram) ``T5Tokenizer`` in which each of ``words`` is one token ``▁word``.

    Other text falls back to single characters (letters, digits, punctuation); words in ``keep_split`` are two
    tokens (``▁sun`` + ``glasses``). Ids: 0 pad, 1 ``</s>``, 2 unk, as in T5.
    ``tokenizer = build_t5_tokenizer(["red", "circle"], model_max_length=32)``
    """
    import string

    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    split = set(keep_split)
    for word in dict.fromkeys(w.lower() for w in words):
        if word in split and len(word) >= 4:
            half = len(word) // 2
            pieces.setdefault("\u2581" + word[:half], -1.0)
            pieces.setdefault(word[half:], -1.0)
        else:
            pieces.setdefault("\u2581" + word, -1.0)
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault(c, -5.0)
        pieces.setdefault("\u2581" + c, -5.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)


def tiny_pipeline(kind: Literal["sd", "sdxl", "sd3", "flux"] = "sd", seed: int = 0,
                  cross_attention_dim: int = 32) -> Any:
    """A random tiny Stable Diffusion (``"sd"``), SDXL (``"sdxl"``), SD3.5 (``"sd3"``) or FLUX.1 (``"flux"``)
    pipeline on the CPU in float32."""
    if kind in ("sd3", "flux"):
        return _tiny_transformer_pipeline(kind, seed, cross_attention_dim)
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(TEST_WORDS, keep_split=["sunglasses"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    text_config = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, hidden_size=cross_attention_dim,
                       intermediate_size=2 * cross_attention_dim, num_attention_heads=4, num_hidden_layers=2,
                       vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=cross_attention_dim)
    if kind == "sd":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=
            6 * 8 + cross_attention_dim, cross_attention_dim=2 * cross_attention_dim, norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=False)
    else:
        raise ValueError(f"unknown kind {kind!r}: use 'sd', 'sdxl', 'sd3' or 'flux'")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_transformer_pipeline(kind: str, seed: int, width: int) -> Any:
    """SD3.5-like (3 blocks: dual attention in block 0, RMS q/k norms, the last block context-pre-only) or
    FLUX.1-like (2 double + 2 single blocks, RoPE axes summing to the head size, guidance embedding)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer(TEST_WORDS, keep_split=["sunglasses"])
    # Shift/scale as the real VAEs of SD3 and FLUX.1 have them.
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    clip_config = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                       pad_token_id=clip_tokenizer.pad_token_id, hidden_size=width, intermediate_size=2 * width,
                       num_attention_heads=4, num_hidden_layers=2, vocab_size=len(clip_tokenizer),
                       max_position_embeddings=77, projection_dim=width)
    if kind == "sd3":
        t5_tokenizer = build_t5_tokenizer(TEST_WORDS, model_max_length=256, keep_split=["sunglasses"])
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=2 * width, d_ff=4 * width, d_kv=16,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=2 * width, caption_projection_dim=16,
            pooled_projection_dim=2 * width, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip_config)), tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip_config)), tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    else:
        t5_tokenizer = build_t5_tokenizer(TEST_WORDS, model_max_length=512, keep_split=["sunglasses"])
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=width, d_ff=2 * width, d_kv=8,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                            text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config)), tokenizer=clip_tokenizer,
                            text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    # 32x32 pixels by default: latents 16x16 (VAE factor 2), an 8x8 grid of image tokens (2x2 patches).
    pipe.default_sample_size = 16
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: T5's dropout would make sampling random
    pipe.set_progress_bar_config(disable=True)
    return pipe
