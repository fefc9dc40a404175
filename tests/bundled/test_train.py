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
                       warm_start=run / "ckpt" / "ema.safetensors", ground_weight=0.1, open_rates=(0.5, 0.5),
                       bind_weight=0.5, coherence_weight=1.0, **TOY)
    line = next(x for x in _log(other).splitlines() if "warm start" in x)
    copied, total = map(int, line.rsplit(": ", 1)[1].split()[0].split("/"))
    assert 0 < copied < total  # the new transformer layer has nothing to copy from
    state = torch.load(other / "unet_state.pt", weights_only=False)["state"]
    assert 0 < state["last_grounding"] <= 2  # the grounding loss ran (token loss and coverage, each at most 1)
    assert 0 <= state["last_binding"] <= 1  # and its pixel side
    assert state["last_coherence"] >= 0  # and the one-colour term of the open-coloured objects
    info = json.loads((tmp_path / "export2" / "training_info.json").read_text())
    assert info["ground_weight"] == 0.1 and info["bind_weight"] == 0.5 and "iou" in info["eval"]["1.5"]
    # grammar v2: the open captions were trained on and the evaluation scored open prompts too
    assert info["open_color_rate"] == info["open_background_rate"] == 0.5
    assert {"open_background_entropy", "open_color_entropy", "open_prompted_acc"} <= set(info["eval"]["1.5"])
    ids = trainer.load_latents(other, 16, (0.5, 0.5))[1]
    tok = trainer.get_tokenizer(other)
    captions = tok.batch_decode(ids, skip_special_tokens=True)
    from attnkit.bundled.scenes import training_prompt

    assert captions == [training_prompt(s, 0.5, 0.5).caption for s in range(16)]
    assert any("background" not in c for c in captions) and any(c.startswith("a ") for c in captions)


def test_grounding_targets_mark_each_object_words_with_its_mask(tmp_path):
    from attnkit.bundled.scenes import render_scene
    from attnkit.bundled.tokenizer import build_tokenizer, object_word_tokens

    tok = build_tokenizer(tmp_path)
    seeds = [0, 1, 2]
    targets = trainer.grounding_targets(tok, seeds, torch.tensor([False, True, False]))
    target, weight = targets[16]
    assert target.shape == (3, tok.model_max_length, 256) and weight.shape == (3, tok.model_max_length)
    assert weight[1].sum() == 0 and target[1].sum() == 0  # a dropped caption has no target
    scene = render_scene(0)
    words = object_word_tokens(tok, scene.spec)
    for obj, positions in zip(scene.objects, words, strict=True):
        cells = torch.from_numpy(obj.mask.reshape(16, 4, 16, 4).mean(axis=(1, 3)).reshape(-1)).float()
        for p in positions["color"] + positions["fill"] + positions["shape"]:
            assert weight[0, p] == 1 and torch.equal(target[0, p], cells)
    grounded = {p for w in words for k in ("color", "fill", "shape") for p in w[k]}
    assert set(torch.nonzero(weight[0]).flatten().tolist()) == grounded  # "a", "and", "on", ... are not
    assert targets[8][0].shape[-1] == 64


def test_grounding_targets_of_open_colours_ground_fill_and_shape_only(tmp_path):
    from attnkit.bundled.scenes import training_prompt
    from attnkit.bundled.tokenizer import build_tokenizer, object_word_tokens

    tok = build_tokenizer(tmp_path)
    seed = next(s for s in range(200) if training_prompt(s, 0.5, 0.5).open_colors)
    prompt = training_prompt(seed, 0.5, 0.5)
    target, weight = trainer.grounding_targets(tok, [seed], torch.tensor([False]), (0.5, 0.5))[16]
    words = object_word_tokens(tok, prompt)
    assert all(not words[i]["color"] for i in prompt.open_colors)
    grounded = {p for w in words for k in ("color", "fill", "shape") for p in w[k]}
    assert set(torch.nonzero(weight[0]).flatten().tolist()) == grounded
    ids = tok(prompt.caption).input_ids
    assert all(tok.convert_ids_to_tokens(ids[p]) in (f"{prompt.spec.objects[i].shape}</w>",)
               for i, w in enumerate(words) for p in w["shape"])


def test_grounding_loss_is_zero_for_attention_spread_over_the_mask():
    target = torch.zeros(1, 3, 4)
    target[0, 1, :2] = 1.0  # token 1's object covers the first two of four cells
    weight = torch.tensor([[0.0, 1.0, 0.0]])
    targets = {2: (target, weight)}

    def loss(cells: list[float]) -> float:
        maps = torch.zeros(1, 4, 3)
        maps[0, :, 1] = torch.tensor(cells)
        return trainer.grounding_loss([maps], targets).item()

    assert loss([0.5, 0.5, 0, 0]) == 0.0  # all inside, spread evenly over the object
    assert abs(loss([1.0, 0, 0, 0]) - 0.5) < 1e-6  # all inside but on one cell: coverage 0.5
    assert abs(loss([0, 0, 0.5, 0.5]) - 2.0) < 1e-6  # all outside: token loss 1 + coverage 1
    assert abs(loss([0.25, 0.25, 0.25, 0.25]) - 0.75) < 1e-6  # half inside: 0.25 + 0.5
    logits = torch.zeros(1, 4, 3, requires_grad=True)  # gradients reach the attention scores
    trainer.grounding_loss([logits.softmax(dim=1)], targets).backward()
    assert logits.grad[0, :2, 1].lt(0).all() and logits.grad[0, 2:, 1].gt(0).all()


def test_binding_loss_is_the_squared_share_of_another_objects_words():
    # two objects: token 1 belongs to the object on cells 0-1, token 2 to the object on cells 2-3
    target = torch.zeros(1, 4, 4)
    target[0, 1, :2] = 1.0
    target[0, 2, 2:] = 1.0
    weight = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    targets = {2: (target, weight)}

    def loss(own: float, other: float, ungrounded: float = 0.0) -> float:
        maps = torch.zeros(1, 4, 4)  # (B, cells, tokens): every cell's distribution over the tokens
        maps[0, :2, 1], maps[0, :2, 2] = own, other
        maps[0, 2:, 2], maps[0, 2:, 1] = own, other
        maps[0, :, 0] = maps[0, :, 3] = ungrounded
        return trainer.binding_loss([maps], targets).item()

    assert loss(0.5, 0.0, 0.25) == 0.0  # each object's pixels attend only to their own words
    assert abs(loss(0.3, 0.1, 0.3) - 0.25**2) < 1e-6  # a quarter of the object-word mass goes astray
    assert abs(loss(0.0, 0.4) - 1.0) < 1e-6
    assert abs(loss(0.3, 0.1, 0.0) - loss(0.3, 0.1, 0.3)) < 1e-6  # the start and padding tokens do not count
    one = {2: (target[:, :2], weight[:, :2])}  # a single object has no other words to attend to
    assert trainer.binding_loss([torch.full((1, 4, 2), 0.5)], one).item() == 0.0
    logits = torch.zeros(1, 4, 4, requires_grad=True)  # the gradient moves each cell towards its own words
    trainer.binding_loss([logits.softmax(dim=2)], targets).backward()
    assert logits.grad[0, :2, 2].gt(0).all() and logits.grad[0, :2, 1].lt(0).all()


def test_coherence_masks_hold_the_interior_of_open_solid_objects_only():
    from attnkit.bundled.scenes import render_scene, training_prompt

    seeds = [s for s in range(400) if any(render_scene(s).objects[i].fill == "solid"
                                          for i in training_prompt(s, 0.5, 0.5).open_colors)][:3]
    full = next(s for s in range(400) if not training_prompt(s, 0.5, 0.5).open_colors)
    masks, rows = trainer.coherence_masks([full] + seeds, torch.zeros(4, dtype=torch.bool), (0.5, 0.5))
    assert len(rows) > 0 and 0 not in rows.tolist()  # a caption naming every colour gives none
    for mask, row in zip(masks, rows, strict=True):
        seed = ([full] + seeds)[row]
        inside = torch.zeros(16, 16, dtype=torch.bool)
        for i in training_prompt(seed, 0.5, 0.5).open_colors:
            obj = render_scene(seed).objects[i]
            inside |= torch.from_numpy(obj.mask.reshape(16, 4, 16, 4).all(axis=(1, 3)))
        assert mask.sum() >= 2 and inside[mask.bool()].all()  # interior cells lie wholly inside an open object
        assert not mask[0].any() and not mask[-1].any()  # and a cell away from its edge
    dropped = torch.ones(4, dtype=torch.bool)  # captions dropped for guidance have nothing to hold
    assert len(trainer.coherence_masks([full] + seeds, dropped, (0.5, 0.5))[1]) == 0
    # with every colour named there is nothing open
    assert len(trainer.coherence_masks(seeds, torch.zeros(3, dtype=torch.bool), (0.0, 0.0))[1]) == 0


def test_coherence_loss_is_the_variance_of_the_error_inside_the_object():
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1.0  # a 2x2 interior
    rows = torch.tensor([0])
    error = torch.zeros(1, 2, 4, 4)
    error[0, :, 1:3, 1:3] = 0.7  # one wrong colour over the whole object: no penalty
    error[0, :, 0, :] = 5.0  # outside the interior: not counted
    assert trainer.coherence_loss(error, mask, rows).item() == 0.0
    error[0, 0, 1, 1:3], error[0, 0, 2, 1:3] = 1.0, -1.0  # channel 0 half one way, half the other
    assert abs(trainer.coherence_loss(error, mask, rows).item() - 0.5) < 1e-6  # variance 1, mean of 2 channels
    assert trainer.coherence_loss(error, mask[:0], rows[:0]).item() == 0.0  # no open objects in the batch
    pred = torch.zeros(1, 2, 4, 4, requires_grad=True)  # the gradient pulls the cells towards their mean
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, 1, 1] = 1.0
    trainer.coherence_loss(pred - target, mask, rows).backward()
    assert pred.grad[0, 0, 1, 1] < 0 and pred.grad[0, 0, 2, 2] > 0 and pred.grad[0, 0, 0, 0] == 0
