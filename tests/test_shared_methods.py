"""attnkit.shared (the methods module): style_aligned, mutual_edit (MasaCtrl), consistent (ConsiStory).

What the calls promise beyond the controllers (tests/controllers/test_shared.py checks the formulas): the
reference's image is what plain generation gives it, real references follow their inversion trajectory, other
controllers compose, and bad input fails before anything runs, leaving the pipeline as it was.
"""

import pytest
import torch
from PIL import Image

import attnkit
from attnkit import AttentionStore, AttnkitError, generate
from attnkit.controllers import Reweight
from attnkit.inversion import Inversion
from attnkit.testing import tiny_pipeline

STEPS = 3


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    torch.set_num_threads(1)
    return tiny_pipeline(request.param)


def close_to(a, b, rel=1e-5):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def pipeline_state(pipe):
    norms = sum(len(m._forward_hooks) for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    return {n: type(p).__name__ for n, p in pipe.unet.attn_processors.items()}, norms, len(pipe.unet._forward_pre_hooks)


def test_style_aligned_keeps_the_reference_and_changes_the_targets(pipe):
    prompts = ["a red circle", "a blue square", "a cat"]
    result = attnkit.style_aligned(pipe, prompts, style="painting", seed=5, steps=STEPS, progress=False)
    assert result.prompts == [f"{p}, painting" for p in prompts]
    free = generate(pipe, result.prompts, seed=5, steps=STEPS, shared_noise=False, progress=False).latents
    assert close_to(result.latents[0], free[0])
    assert all((result.latents[i] - free[i]).abs().max() > 1e-3 for i in (1, 2))
    assert result.reference is result.images[0] and result.targets == result.images[1:]
    record = result.record()
    assert record["method"] == "style_aligned" and record["style"] == "painting" and record["references"] == [0]
    assert record["share_group_norm"] == (pipe.unet.config.addition_embed_type != "text_time")


def test_a_models_own_group_norm_choice_is_style_aligneds_default(tmp_path):
    import json

    model = tiny_pipeline("sd")  # the official rule would share its group norms (SD1.x)
    (tmp_path / "attnkit.json").write_text(json.dumps({"style_group_norm": False}))
    model._attnkit_folder = str(tmp_path)
    prompts = ["a red circle", "a blue square"]
    own = attnkit.style_aligned(model, prompts, seed=1, steps=2, progress=False)
    off = attnkit.style_aligned(model, prompts, seed=1, steps=2, share_group_norm=False, progress=False)
    on = attnkit.style_aligned(model, prompts, seed=1, steps=2, share_group_norm=True, progress=False)
    assert own.record()["share_group_norm"] is False and on.record()["share_group_norm"] is True
    assert torch.equal(own.latents, off.latents) and (own.latents[1] - on.latents[1]).abs().max() > 1e-4


def test_mutual_edit_keeps_the_source(pipe):
    result = attnkit.mutual_edit(pipe, "a red circle", ["a red square", "a red triangle"], seed=2, start_step=1,
                                 start_layer=0, steps=STEPS, progress=False)
    free = generate(pipe, result.prompts, seed=2, steps=STEPS, progress=False).latents  # one shared noise
    assert close_to(result.latents[0], free[0])
    assert (result.latents[1:] - free[1:]).abs().max() > 1e-3
    masked = attnkit.mutual_edit(pipe, "a red circle", "a red square", mask_words=["circle", "square"], seed=2,
                                 start_step=1, start_layer=0, steps=STEPS, progress=False)
    assert masked.record()["mask_words"] == ["circle", "square"]
    assert close_to(masked.latents[0], free[0])


def test_consistent_keeps_the_reference(pipe):
    prompts = ["a cat", "a red cat on a field", "a cat wearing sunglasses"]
    result = attnkit.consistent(pipe, prompts, subject="cat", seed=1, steps=STEPS, progress=False)
    free = generate(pipe, prompts, seed=1, steps=STEPS, shared_noise=False, progress=False).latents
    assert close_to(result.latents[0], free[0])
    assert (result.latents[1:] - free[1:]).abs().max() > 1e-6
    assert result.record()["subject"] == "cat" and result.record()["mask_dropout"] == 0.5


def test_methods_compose_with_a_store_and_a_reweight(pipe):
    prompts = ["a red circle", "a red square", "a red cat"]
    store = AttentionStore(kinds="cross", res=None)
    result = attnkit.style_aligned(pipe, prompts, seed=1, steps=STEPS, controllers=[store], progress=False)
    maps = store.word_maps(prompts[2], row=2)
    assert set(maps) == {"a", "red", "cat"}
    weighted = attnkit.style_aligned(pipe, prompts, seed=1, steps=STEPS, progress=False,
                                     controllers=[Reweight(prompts, pipe.tokenizer, {"cat": 4.0})])
    assert (weighted.latents[2] - result.latents[2]).abs().max() > 1e-4
    assert close_to(weighted.latents[0], result.latents[0])


def test_real_reference_follows_its_inversion(pipe):
    photo = Image.new("RGB", (48, 40), (230, 40, 40))
    prompts = ["a red circle on a white background", "a blue square", "a cat"]
    result = attnkit.style_aligned(pipe, prompts, reference=photo, steps=STEPS, seed=3, progress=False)
    inv = result.inversion
    assert isinstance(inv, Inversion) and inv.method == "ddim" and inv.inversion_guidance == 2.0
    # the reference row ends exactly on the encoded image: forced onto the trajectory after every step
    torch.testing.assert_close(result.latents[0], inv.latents[0].to(result.latents), atol=0, rtol=0)
    again = attnkit.style_aligned(pipe, prompts, reference=inv, steps=STEPS, seed=3, progress=False)
    torch.testing.assert_close(again.latents, result.latents, atol=0, rtol=0)  # an Inversion is reused as is
    generated = attnkit.style_aligned(pipe, prompts, steps=STEPS, seed=3, progress=False)
    assert (generated.latents[1:] - result.latents[1:]).abs().max() > 1e-3  # the targets follow the photo
    assert result.record()["real_reference"] is True
    edit = attnkit.mutual_edit(pipe, "", "a red square", reference=photo, steps=STEPS, start_step=1,
                               progress=False)
    torch.testing.assert_close(edit.latents[0], edit.inversion.latents[0].to(edit.latents), atol=0, rtol=0)


@pytest.mark.parametrize("call, message", [
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat"]), "at least 2 prompts"),
    (lambda p, tmp: attnkit.style_aligned(p, "a cat"), "at least 2 prompts"),
    (lambda p, tmp: attnkit.mutual_edit(p, "a cat", []), "at least 2 prompts"),
    (lambda p, tmp: attnkit.consistent(p, ["a cat"], subject="cat"), "at least 2 prompts"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], reference=tmp / "missing.png"), "does not exist"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], reference=tmp / "broken.png"),
     "is not an image PIL can read"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], layers=[42]), "layer 42 does not exist"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], only_self_level=2.0), "only_self_level"),
    (lambda p, tmp: attnkit.mutual_edit(p, "a cat", "a dog", start_layer=99), "start_layer=99"),
    (lambda p, tmp: attnkit.consistent(p, ["a cat", "a dog"], subject="cat"),
     "subject word 'cat' is not in the prompt 'a dog'"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], style=""), "style"),
    (lambda p, tmp: attnkit.style_aligned(p, ["a cat", "a dog"], controllers=["store"]), "not an attnkit Controller"),
])
def test_bad_input_fails_clearly_and_leaves_the_pipeline_alone(pipe, tmp_path, call, message):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    before = pipeline_state(pipe)
    with pytest.raises(AttnkitError, match=message):
        call(pipe, tmp_path)
    assert pipeline_state(pipe) == before


def test_real_reference_needs_ddim(pipe):
    from diffusers import EulerDiscreteScheduler

    other = tiny_pipeline("sd")
    other.scheduler = EulerDiscreteScheduler.from_config(other.scheduler.config)
    with pytest.raises(AttnkitError, match="use_ddim"):
        attnkit.style_aligned(other, ["a cat", "a dog"], reference=Image.new("RGB", (32, 32)))


def test_public_names_stay_callables_in_a_fresh_interpreter():
    # attnkit.shared is a module beside the exported functions; importing it or the CLI must not shadow them
    import subprocess
    import sys

    code = ("import attnkit, attnkit.cli, attnkit.shared; "
            "assert all(callable(f) and f.__module__ == 'attnkit.shared' for f in "
            "(attnkit.style_aligned, attnkit.mutual_edit, attnkit.consistent)); "
            "assert attnkit.SharedResult is attnkit.shared.SharedResult")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
