"""Tiny random pipelines built from config dicts, for tests and benchmarks (no download needed).

    pipe = tiny_pipeline("sd")            # SD1.x-like: 2 resolutions, self- and cross-attention
    pipe = tiny_pipeline("sdxl")          # SDXL-like: text_embeds + time_ids conditioning, 2 text encoders

The tokenizer is a real byte-level BPE ``CLIPTokenizer`` built locally: every text tokenizes (unknown words
split into byte tokens), and the words in :data:`TEST_WORDS` are single tokens.
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


def tiny_pipeline(kind: Literal["sd", "sdxl"] = "sd", seed: int = 0, cross_attention_dim: int = 32) -> Any:
    """A random tiny Stable Diffusion (``"sd"``) or SDXL (``"sdxl"``) pipeline on the CPU in float32."""
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
        raise ValueError(f"unknown kind {kind!r}: use 'sd' or 'sdxl'")
    pipe.set_progress_bar_config(disable=True)
    return pipe
