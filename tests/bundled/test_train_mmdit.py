"""The MM-DiT trainer: its stand-in T5 token is exact, its grounding maps are the adapter's, it exports an SD3
folder, resumes from safetensors + json."""

import json
from types import SimpleNamespace

import pytest
import torch

from attnkit.bundled import train_mmdit as tm
from attnkit.engine import Controller, Layout, control

TINY = {"num_layers": 2, "num_attention_heads": 2}


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(tm.TRANSFORMER_CONFIGS, "tiny", TINY)
    return "tiny"


def _inputs(batch=3, clip=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    seq = torch.randn(batch, clip, 2 * tm.TEXT_DIM, generator=g)
    pooled = torch.randn(batch, 2 * tm.TEXT_DIM, generator=g)
    sigma = torch.rand(batch, generator=g)
    return x, seq, pooled, sigma


@torch.no_grad()
def test_stand_in_token_is_the_pipelines_zero_t5_tokens(tiny_size):
    torch.manual_seed(0)
    model = tm.make_transformer(tiny_size).eval()
    x, seq, pooled, sigma = _inputs()
    zeros = torch.zeros(3, tm.T5_COPIES, seq.shape[-1])
    with_t5 = model(x, torch.cat([seq, zeros], 1), pooled, sigma * 1000).sample  # what the pipeline runs
    without = model(x, seq, pooled, sigma * 1000).sample  # max_sequence_length=0
    assert not torch.allclose(with_t5, without, atol=1e-3)  # the zero tokens do matter
    proc = tm.install_processor(model)
    ours = tm.forward(model, proc, x, sigma, seq, pooled, torch.tensor([tm.T5_COPIES, 0, tm.T5_COPIES]))
    torch.testing.assert_close(ours[[0, 2]], with_t5[[0, 2]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], without[1], atol=1e-4, rtol=1e-4)
    tm.restore_processor(model)
    torch.testing.assert_close(model(x, seq, pooled, sigma * 1000).sample, without)


class _CrossProbs(Controller):
    def __init__(self):
        self.maps = []

    def observe(self, call):
        if call.is_cross:
            self.maps.append(call.probs().mean(1))


@torch.no_grad()
def test_grounding_maps_are_the_adapters_cross_view(tiny_size):
    torch.manual_seed(0)
    model = tm.make_transformer(tiny_size).eval()
    x, seq, pooled, sigma = _inputs(batch=2)
    zeros = torch.zeros(2, tm.T5_COPIES, seq.shape[-1])
    probe = _CrossProbs()
    with control(SimpleNamespace(transformer=model), probe, layout=Layout(prompts=2, cfg=False)) as ctl:
        ctl.set_step(0, 1)
        model(x, torch.cat([seq, zeros], 1), pooled, sigma * 1000)
    proc = tm.install_processor(model)
    proc.tap, proc.clip_tokens = [], seq.shape[1]
    tm.forward(model, proc, x, sigma, seq, pooled, torch.tensor([tm.T5_COPIES] * 2))
    assert len(proc.tap) == len(probe.maps) == TINY["num_layers"]
    for ours, theirs in zip(proc.tap, probe.maps, strict=True):
        assert ours.shape == (2, 256, seq.shape[1])
        torch.testing.assert_close(ours, theirs[..., : seq.shape[1]], atol=1e-5, rtol=1e-4)


def test_train_exports_an_sd3_folder_and_resumes(tmp_path, tiny_size):
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    run = tmp_path / "run"
    tm.prepare_run_dir(run, 8)
    assert json.loads((run / "vae" / "config.json").read_text())["shift_factor"] == 0.0
    export = tmp_path / "export"
    toy = dict(size=tiny_size, batch=4, eval_n=2, guidances=(2.0,), steps=2, export_dir=export, warmup=5)
    tm.train_mmdit(run, 0.05, 8, **toy)
    state = json.loads((run / "ckpt" / "state.json").read_text())
    first = state["step"]
    assert first > 0 and 0 < state["last_grounding"] <= 2
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
        "adam.safetensors", "ema.safetensors", "state.json", "weights.safetensors"]
    pipe = StableDiffusion3Pipeline.from_pretrained(export, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.patch_size == 1 and pipe.vae.config.shift_factor == 0.0
    defaults = json.loads((export / "attnkit.json").read_text())
    assert defaults["max_sequence_length"] == 0 and defaults["num_inference_steps"] == 2
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=0).images[0]
    assert image.size == (64, 64)

    tm.train_mmdit(run, 0.03, 8, **toy)
    assert json.loads((run / "ckpt" / "state.json").read_text())["step"] > first
    assert f"resumed at step {first}" in (run / "train.log").read_text()


def test_text_encoders_start_from_the_unet_models():
    from transformers import CLIPTextModel

    trained = CLIPTextModel.from_pretrained(tm.BUNDLED_UNET_MODEL / "text_encoder").state_dict()
    for te in tm.make_text_encoders():
        for name, value in te.text_model.state_dict().items():
            torch.testing.assert_close(value, trained[name])


def test_cli_family_mmdit_calls_the_mmdit_trainer(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnkit.cli import app

    seen = {}
    monkeypatch.setattr(tm, "train", lambda **kwargs: seen.update(kwargs))
    args = ["train-bundled", "--family", "mmdit", "--run-dir", str(tmp_path / "run"), "--minutes", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"run_dir": tmp_path / "run", "minutes": 0.5, "export_dir": tmp_path / "run" / "model",
                    "n_scenes": 60_000, "lr": 8e-4, "ground_weight": 0.1, "open_color_rate": 0.2,
                    "open_background_rate": 0.25}
    result = CliRunner().invoke(app, [*args, "--lr", "3e-4", "--open-color-rate", "0"])
    assert result.exit_code == 0 and seen["lr"] == 3e-4 and seen["open_color_rate"] == 0.0
    result = CliRunner().invoke(app, [*args, "--family", "vit"])
    assert result.exit_code == 2 and "use unet or mmdit" in result.output
    result = CliRunner().invoke(app, [*args, "--bind-weight", "0.5"])
    assert result.exit_code == 2 and "unet only" in result.output
