"""The bundled model's trainer on a toy budget: it exports a loadable SD folder, resumes, warm-starts."""

import json

import torch

from attnkit.bundled import train as trainer

TOY = dict(batch=4, eval_n=2, guidances=(1.5,))


def _log(run_dir) -> str:
    return (run_dir / "train.log").read_text()


def test_train_export_resume_and_warm_start(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    run = tmp_path / "run"
    (run / "vae").mkdir(parents=True)
    trainer.make_vae().save_pretrained(run / "vae")  # an untrained autoencoder is enough to exercise the rest
    (run / "vae" / "DONE").write_text("{}")
    trainer.encode_scenes(run, 16)
    export = tmp_path / "export"
    trainer.train_unet(run, 0.02, 16, export_dir=export, text_layers=0, **TOY)

    pipe = StableDiffusionPipeline.from_pretrained(export)
    assert pipe.text_encoder.config.num_hidden_layers == 0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    defaults = json.loads((export / "attnkit.json").read_text())
    assert defaults["height"] == 64 and defaults["null_text_lr"] > 0
    first = torch.load(run / "unet_state.pt", weights_only=False)["state"]["step"]
    assert first > 0

    trainer.train_unet(run, 0.02, 16, export_dir=export, text_layers=0, restart_schedule=True, **TOY)
    state = torch.load(run / "unet_state.pt", weights_only=False)["state"]
    assert state["step"] > first and state["schedule_start"] == first
    assert f"resumed at step {first}" in _log(run) and "new learning-rate schedule" in _log(run)

    # a fresh run with a deeper text encoder starts from every tensor the checkpoint has of the same shape
    other = tmp_path / "other"
    other.mkdir()
    for name in ("vae", "tokenizer", "data"):
        (other / name).symlink_to(run / name)
    trainer.train_unet(other, 0.01, 16, export_dir=tmp_path / "export2", text_layers=1,
                       warm_start=run / "ckpt" / "ema.safetensors", **TOY)
    line = next(x for x in _log(other).splitlines() if "warm start" in x)
    copied, total = map(int, line.rsplit(": ", 1)[1].split()[0].split("/"))
    assert 0 < copied < total  # the new transformer layer has nothing to copy from
