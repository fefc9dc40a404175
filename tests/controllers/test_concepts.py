"""ConceptAttention on the tiny MM-DiT pipelines: the image is unchanged, and the saliency matches a by-hand
oracle of the official FLUX block (concept stream through the text weights, concept attention over
``[concepts; image]``, softmax over concepts of output-space dot products)."""

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import AttnkitError, control, generate
from attnkit.concepts import ConceptMaps, check_concepts, concept_maps, embed_concepts
from attnkit.controllers.concepts import ConceptAttention, concept_scores, default_blocks
from attnkit.testing import tiny_pipeline

PROMPT = "a red cat wearing sunglasses"
CONCEPTS = ["cat", "sunglasses", "red"]


def test_image_unchanged_with_concept_attention(mmdit):
    plain = generate(mmdit, PROMPT, steps=2, progress=False)
    ca = ConceptAttention(embed_concepts(mmdit, CONCEPTS))
    with_ca = generate(mmdit, PROMPT, ca, steps=2, progress=False)
    assert (with_ca.latents - plain.latents).abs().max() <= 1e-5
    maps = ca.maps()
    assert maps.shape == (3, 8, 8)
    assert torch.allclose(maps.sum(0), torch.ones(8, 8), atol=1e-5)  # a softmax over the concepts
    assert ca.steps_seen == {0, 1}


def test_hooks_removed_after_the_block_and_on_errors(mmdit):
    model = mmdit.transformer
    saved = dict(model.attn_processors)
    ca = ConceptAttention(embed_concepts(mmdit, CONCEPTS))
    with pytest.raises(RuntimeError, match="boom"):
        with control(mmdit, ca):
            assert model.context_embedder._forward_pre_hooks
            raise RuntimeError("boom")
    assert not model.context_embedder._forward_pre_hooks
    assert all(not b._forward_pre_hooks for b in getattr(model, "single_transformer_blocks", []))
    assert {k: type(v) for k, v in model.attn_processors.items()} == {k: type(v) for k, v in saved.items()}


def _capture_blocks(pipe):
    """Forward pre-hooks that record each double-stream block's inputs (a plain diffusers run)."""
    records, handles = [], []
    for block in pipe.transformer.transformer_blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k: records.append({n: v for n, v in k.items() if torch.is_tensor(v) or n ==
                                            "image_rotary_emb"}), with_kwargs=True))
    return records, handles


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1))  # (B, S, H, d)


def test_flux_saliency_matches_a_by_hand_concept_stream(flux_pipe):
    """Oracle: the concept stream propagated by hand through FLUX's double blocks (text weights), the
    saliency of the last block computed from the formulas."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = flux_pipe
    tokens = embed_concepts(pipe, CONCEPTS)
    records, handles = _capture_blocks(pipe)
    try:
        plain = generate(pipe, PROMPT, steps=1, progress=False)
    finally:
        for h in handles:
            h.remove()
    ca = ConceptAttention(tokens, blocks=[-1])
    generate(pipe, PROMPT, ca, steps=1, progress=False)
    assert ca.layers == ["transformer_blocks.1.attn.cross"]

    model = pipe.transformer
    with torch.no_grad():
        c = model.context_embedder(tokens[None].to(model.dtype))
        expected = None
        for block, rec in zip(model.transformer_blocks, records, strict=True):
            h, e, temb = rec["hidden_states"], rec["encoder_hidden_states"], rec["temb"]
            cos, sin = rec["image_rotary_emb"]
            n_txt = e.shape[1]
            attn = block.attn
            norm_img = block.norm1(h, emb=temb)[0]
            norm_txt = block.norm1_context(e, emb=temb)[0]
            norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)

            def qkv(x, to_q, to_k, to_v, nq, nk, rope=None, heads=attn.heads):
                q, k, v = (_heads(f(x), heads) for f in (to_q, to_k, to_v))
                q, k = nq(q), nk(k)
                if rope is not None:
                    q, k = (apply_rotary_emb(t, rope, sequence_dim=1) for t in (q, k))
                return [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, S, d)

            qi, ki, vi = qkv(norm_img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k,
                             (cos[n_txt:], sin[n_txt:]))
            qt, kt, vt = qkv(norm_txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                             attn.norm_added_k, (cos[:n_txt], sin[:n_txt]))
            qc, kc, vc = qkv(norm_c, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                             attn.norm_added_k)
            img_out = F.scaled_dot_product_attention(qi, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
            c_out = F.scaled_dot_product_attention(qc, torch.cat([kc, ki], 2), torch.cat([vc, vi], 2))
            flat = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
            expected = torch.einsum("bcd,bpd->bcp", flat(c_out), flat(img_out)).softmax(dim=1)
            c = c + gate_msa.unsqueeze(1) * attn.to_add_out(flat(c_out))
            normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            c = c + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    torch.testing.assert_close(ca.maps(), expected[0].reshape(3, 8, 8), atol=1e-5, rtol=1e-4)
    assert plain.latents is not None


def test_sd3_saliency_matches_the_formula_at_block_0(sd3_pipe):
    """Oracle at SD3's first block: concepts = context_embedder(tokens), modulated by the block's text norm;
    the conditional row of the guidance batch is read."""
    pipe = sd3_pipe
    tokens = embed_concepts(pipe, CONCEPTS)
    records, handles = _capture_blocks(pipe)
    try:
        generate(pipe, PROMPT, steps=1, progress=False)
    finally:
        for h in handles:
            h.remove()
    ca = ConceptAttention(tokens, blocks=[0])
    generate(pipe, PROMPT, ca, steps=1, progress=False)
    model = pipe.transformer
    block, rec = model.transformer_blocks[0], records[0]
    with torch.no_grad():
        h, e, temb = rec["hidden_states"], rec["encoder_hidden_states"], rec["temb"]
        c = model.context_embedder(tokens[None].expand(h.shape[0], -1, -1).to(model.dtype))
        attn = block.attn
        norm_img = block.norm1(h, emb=temb)[0]
        norm_txt = block.norm1_context(e, emb=temb)[0]
        norm_c = block.norm1_context(c, emb=temb)[0]

        def qkv(x, to_q, to_k, to_v, nq, nk):
            q, k, v = (_heads(f(x), attn.heads).transpose(1, 2) for f in (to_q, to_k, to_v))
            return nq(q), nk(k), v

        qi, ki, vi = qkv(norm_img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        qt, kt, vt = qkv(norm_txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                         attn.norm_added_k)
        qc, kc, vc = qkv(norm_c, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                         attn.norm_added_k)
        img_out = F.scaled_dot_product_attention(qi, torch.cat([ki, kt], 2), torch.cat([vi, vt], 2))
        c_out = F.scaled_dot_product_attention(qc, torch.cat([kc, ki], 2), torch.cat([vc, vi], 2))
        expected = concept_scores(c_out, img_out)[1]  # the conditional row
    torch.testing.assert_close(ca.maps(), expected.reshape(3, 8, 8), atol=1e-5, rtol=1e-4)


def test_concept_scores_formula():
    c = torch.randn(1, 2, 3, 4)
    p = torch.randn(1, 2, 5, 4)
    raw = torch.einsum("bhcd,bhpd->bcp", c, p)  # the per-head dot products summed = heads concatenated
    torch.testing.assert_close(concept_scores(c, p), raw.softmax(dim=1))


def test_default_blocks_follow_the_paper():
    assert default_blocks(19) == (15, 16, 17, 18)
    assert default_blocks(24) == tuple(range(19, 24))
    assert default_blocks(2) == (1,)
    with pytest.raises(AttnkitError):
        default_blocks(0)


def test_concept_maps_generated_and_real(mmdit):
    maps = concept_maps(mmdit, PROMPT, CONCEPTS, steps=2, progress=False)
    assert isinstance(maps, ConceptMaps) and maps.concepts == CONCEPTS
    assert maps["cat"].shape == (8, 8) and maps.upsample().shape == (3, 32, 32)
    labels = maps.segment()
    assert labels.shape == (32, 32) and int(labels.max()) < 3
    assert torch.equal(maps.mask("cat"), labels == 0)
    assert maps.strip().width > maps.image.width
    real = concept_maps(mmdit, "", ["cat", "background"], image=maps.image, samples=2, progress=False)
    assert real.maps.shape == (2, 8, 8) and real.settings["real_image"] and real.steps == [0]
    assert real.record()["method"] == "concept-attention"


def test_composes_with_the_store(mmdit):
    store = attnkit.AttentionStore(res=None)
    maps = concept_maps(mmdit, PROMPT, CONCEPTS, store, steps=2, progress=False)
    assert store.word_map(PROMPT, "cat").shape == maps["cat"].shape


def test_bad_input(mmdit):
    with pytest.raises(AttnkitError, match="no concepts"):
        check_concepts([])
    with pytest.raises(AttnkitError, match="repeat"):
        check_concepts(["cat", "cat"])
    with pytest.raises(AttnkitError, match="list of words"):
        check_concepts("cat")
    with pytest.raises(AttnkitError, match="does not exist"):
        concept_maps(mmdit, PROMPT, CONCEPTS, blocks=[7], steps=1, progress=False)
    with pytest.raises(AttnkitError, match="noise_level"):
        concept_maps(mmdit, "", CONCEPTS, image=tiny_image(), noise_level=0.0, progress=False)
    with pytest.raises(AttnkitError, match="prompt is empty"):
        concept_maps(mmdit, " ", CONCEPTS, progress=False)
    with pytest.raises(AttnkitError, match="channels"):
        with control(mmdit, ConceptAttention(torch.zeros(2, 3))):
            pass
    assert not mmdit.transformer.context_embedder._forward_pre_hooks


def test_refused_on_a_unet():
    pipe = tiny_pipeline("sd")
    with pytest.raises(AttnkitError, match="MM-DiT"):
        concept_maps(pipe, PROMPT, CONCEPTS, progress=False)
    with pytest.raises(AttnkitError, match="cannot act"):
        with control(pipe, ConceptAttention(torch.zeros(2, 32))):
            pass


def tiny_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_flux_true_cfg_negative_pass_carries_the_concepts_unseen(flux_pipe):
    """FLUX's true CFG runs the negative prompt as a second pass per step: the concept tokens ride it too (the
    shapes work), the image is unchanged, and only the conditional pass is read."""
    kw = dict(num_inference_steps=2, true_cfg_scale=2.0, negative_prompt="a blue cat", output_type="latent")
    plain = flux_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    ca = ConceptAttention(embed_concepts(flux_pipe, CONCEPTS))
    with control(flux_pipe, ca) as ctl:
        latents = flux_pipe(PROMPT, generator=torch.Generator().manual_seed(0), callback_on_step_end=ctl.callback,
                            **kw).images
    assert (latents - plain).abs().max() <= 1e-5
    assert ca.counts == {"transformer_blocks.1.attn.cross": 2}


def test_bfloat16_flux_runs_and_leaves_the_image_unchanged():
    """FLUX passes t / 1000 in bfloat16 (8 bits): the engine still finds the step (it once refused it)."""
    pipe = tiny_pipeline("flux").to(torch.bfloat16)
    plain = generate(pipe, PROMPT, steps=2, progress=False)
    ca = ConceptAttention(embed_concepts(pipe, CONCEPTS))
    with_ca = generate(pipe, PROMPT, ca, steps=2, progress=False)
    assert torch.equal(with_ca.latents, plain.latents)
    assert ca.steps_seen == {0, 1} and ca.maps().dtype == torch.float32
