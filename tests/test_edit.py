"""attnkit.edit: the one-call Prompt-to-Prompt API; bad inputs fail with one clear error, pipeline untouched."""

import json

import pytest
import torch

from attnkit import AttnkitError, generate
from attnkit.edit import edit
from attnkit.testing import tiny_pipeline

SOURCE = "a lemon cake"
TARGETS = ["a chocolate cake", "a lego cake"]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline("sd")


def run(pipe, source=SOURCE, targets=TARGETS, **kw):
    return edit(pipe, source, targets, seed=5, steps=3, guidance=7.5, progress=False, **kw)


def test_edit_returns_source_edits_maps_and_settings(pipe):
    result = run(pipe, blend=["cake"], reweight={"lego": 2.0}, cross={"default_": 0.8, "lego": 0.5})
    assert len(result.edits) == 2 and result.source is result.images[0]
    assert result.prompts == [SOURCE, *TARGETS]
    maps = result.maps()
    assert list(maps[2]) == ["a", "lego", "cake"] and maps[2]["lego"].ndim == 2
    record = json.loads(json.dumps(result.record()))
    assert record["kind"] == "replace" and record["reweight"] == {"lego": 2.0} and record["self"] == 0.4
    plain = generate(pipe, [SOURCE, *TARGETS], seed=5, steps=3, guidance=7.5, progress=False)
    # the source row is never edited (float32: rows of a layer with mixed maps go through explicit softmax)
    torch.testing.assert_close(result.latents[0], plain.latents[0], atol=1e-4, rtol=0)
    assert (result.latents[1:] - plain.latents[1:]).abs().max() > 1e-3


def test_auto_kind_refines_when_words_are_added(pipe):
    assert run(pipe, "a cake", ["a lego cake"]).settings["kind"] == "refine"


def test_uncond_embeddings_are_used_step_by_step(pipe):
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = pipe.text_encoder(ids)[0].detach()
    base = run(pipe, maps=False)
    same = run(pipe, maps=False, uncond_embeddings=[empty] * 3)
    torch.testing.assert_close(same.latents, base.latents)
    late = run(pipe, maps=False, uncond_embeddings=[empty, empty, empty + 0.5])
    assert (late.latents - base.latents).abs().max() > 1e-4  # step 2's embedding reached the UNet
    with pytest.raises(AttnkitError, match="2 entries for 3 steps"):
        run(pipe, uncond_embeddings=[empty] * 2)


BAD = [
    (dict(source="a lemon cake", targets=["a big lemon cake"], kind="replace"), "same number of words"),
    (dict(cross={"default_": 0.8, "beet": 0.3}), "'beet', which is not a word of any target"),
    (dict(blend=["castle"]), "blend word 'castle' is in none of the prompts"),
    (dict(target_uncond="source"), "target_uncond='source'"),
    (dict(reweight={"beet": 2.0}), "cannot re-weight 'beet'"),
    (dict(targets=["a " + "lego " * 80 + "cake"]), "tokens long but the model reads at most 77"),
    (dict(source="a " + "lemon " * 80 + "cake"), "tokens long but the model reads at most 77"),
    (dict(targets=[]), "no target prompt"),
    (dict(kind="swap"), "kind='swap'"),
    (dict(self=1.5), "0 <= start <= end <= 1"),
    (dict(subtract=["a"]), "subtract words need blend words"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_one_clear_error_pipeline_unchanged(pipe, kwargs, message):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(AttnkitError, match=message) as info:
        run(pipe, **kwargs)
    assert "\n" not in str(info.value)
    assert dict(pipe.unet.attn_processors) == before
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())


def test_cli_edit_writes_grid_images_and_record(tmp_path):
    from typer.testing import CliRunner

    from attnkit.cli import app
    from attnkit.viz import read_png_metadata

    out = tmp_path / "edit"
    args = ["edit", SOURCE, "--to", TARGETS[0], "--to", TARGETS[1], "--model", "tiny", "--steps", "2",
            "--cross", "0.2,0.9", "--cross-word", "lego=0.5", "--self", ".4", "--blend", "cake", "--reweight",
            "lego=-1", "--quiet", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["targets"] == TARGETS and record["cross"] == {"default_": [0.2, 0.9], "lego": 0.5}
    assert record["reweight"] == {"lego": -1.0} and record["blend"] == ["cake"]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["grid.png", "00_source.png", "01_chocolate.png", "02_lego.png", "record.json"])
    assert read_png_metadata(out / "02_lego.png")["edited_prompt"] == TARGETS[1]
    bad = CliRunner().invoke(app, ["edit", SOURCE, "--to", "a big lemon cake", "--kind", "replace", "--model",
                                   "tiny", "--steps", "2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "same number of words" in bad.output and not (tmp_path / "bad").exists()


def test_subtract_threshold_reaches_the_local_blend(pipe):
    from attnkit.controllers import LocalBlend
    from attnkit.edit import build_controllers

    prompts = ["a red circle and a square", "a blue circle and a square"]
    blend = [c for c in build_controllers(pipe.tokenizer, prompts, blend=["circle"], subtract=["square"],
                                          subtract_threshold=0.7) if isinstance(c, LocalBlend)][0]
    assert blend.subtract_threshold == 0.7
    result = edit(pipe, prompts[0], prompts[1:], blend=["circle"], subtract=["square"], subtract_threshold=0.7,
                  steps=2, maps=False, progress=False)
    assert result.settings["subtract_threshold"] == 0.7


def test_steps_zero_is_refused_not_replaced_by_the_default(pipe):
    with pytest.raises(AttnkitError, match="steps=0: give from 1 to 1000"):
        edit(pipe, SOURCE, TARGETS, steps=0, progress=False)
    with pytest.raises(AttnkitError, match="steps=0"):
        generate(pipe, SOURCE, steps=0, progress=False)
    for size in ({"height": 0}, {"width": 30}):
        with pytest.raises(AttnkitError, match="multiples of 8"):
            generate(pipe, SOURCE, steps=1, progress=False, **size)
    for guidance in (float("nan"), float("inf")):
        with pytest.raises(AttnkitError, match="finite guidance"):
            generate(pipe, SOURCE, steps=1, guidance=guidance, progress=False)
