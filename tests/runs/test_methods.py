"""Each method's run equals the CLI command its record names (same files, same pixels), batched runs equal
runs alone, and the pipeline is left as it was."""

import json
import shlex

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit import AttnkitError, read_png_metadata
from attnkit.cli import app
from attnkit.runs import (
    RunContext,
    execute,
    execute_batch,
    load_model,
    parse_request,
    staged_folder,
    write_output,
)
from attnkit.runs.execute import batch_key

CTX = RunContext(model="tiny", device="cpu")


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    image = np.zeros((40, 48, 3), np.uint8)
    image[:] = (250, 250, 250)
    image[10:30, 12:36] = (220, 30, 30)
    Image.fromarray(image).save(path)
    return str(path)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def run_to(pipe, request, folder):
    output = execute(pipe, request, CTX)
    with staged_folder(folder) as staging:
        return output, write_output(output, staging, CTX, out=folder)


def invoke_line(line):
    args = shlex.split(line)
    assert args[0] == "attnkit"
    return CliRunner().invoke(app, args[1:] + ["--quiet", "--threads", "1"])


JOBS = {
    "generate": {"method": "generate", "prompt": "a red circle on a white background", "seed": 5, "steps": 2,
                 "guidance": 3.0},
    "maps": {"method": "maps", "prompt": "a red circle and a blue square", "seed": 2, "steps": 2,
             "words": ["red", "square"], "self_at": [3, 4]},
    "edit": {"method": "edit", "source": "a lemon cake", "targets": ["a lego cake", "a beet cake"], "seed": 8,
             "steps": 2, "cross": [0.0, 0.8], "self": 0.3, "blend": ["cake"], "reweight": {"lego": 2.0},
             "cross_words": {"lego": 0.5}},
    "segment": {"method": "segment", "prompt": "a red circle and a blue square", "seed": 4, "steps": 2,
                "clustering": "merge", "segments": 3, "words": ["circle", "square"], "threshold": 0.3},
    "style": {"method": "style", "prompts": ["a red circle", "a blue square", "a green triangle"], "seed": 3,
              "steps": 2, "style": "outlined", "shift": 0.5, "adain_values": True, "group_norm": False,
              "only_self_level": 0.25},
    "consistent": {"method": "consistent", "prompts": ["a red circle", "a circle on a black background"],
                   "subject": "circle", "mask_dropout": 0.3, "seed": 6, "steps": 2},
    "mutual-edit": {"method": "mutual-edit", "source": "a red circle", "targets": ["a red square", "a red diamond"],
                    "start_step": 1, "start_layer": 0.5, "mask_words": ["red"], "mask_threshold": 0.2, "seed": 2,
                    "steps": 2},
    "transfer": {"method": "transfer", "structure": "a red circle", "appearance": "a blue square",
                 "prompt": "a red circle", "seed": 7, "steps": 1, "contrast": 1.5, "swap_guidance": 2.0,
                 "masks": "attention", "object_words": ["circle", "square"]},
}


@pytest.mark.parametrize("name", list(JOBS))
def test_a_run_equals_the_cli_command_in_its_record(pipe, tmp_path, name):
    request = parse_request(JOBS[name])
    _, record = run_to(pipe, request, tmp_path / "runs")
    assert record["cli"].startswith(f"attnkit {name} ") and "batch" not in record["cli"]
    cli_out = tmp_path / "cli"
    result = invoke_line(record["cli"].replace(str(tmp_path / "runs"), str(cli_out)))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "runs") == files_under(cli_out)
    cli_record = json.loads((cli_out / "record.json").read_text())
    for key in ("command", "prompt", "model", "seed", "steps", "guidance", "height", "width", "files"):
        assert record.get(key) == cli_record.get(key), key
    for png in (p for p in files_under(cli_out) if p.endswith(".png")):
        assert np.array_equal(pixels(tmp_path / "runs" / png), pixels(cli_out / png)), png
    meta = read_png_metadata(tmp_path / "runs" / files_under(cli_out)[0])
    assert meta["model"] == "tiny" and meta["seed"] == JOBS[name]["seed"]


def test_invert_and_a_real_image_edit_equal_their_cli_commands(pipe, tmp_path, photo):
    for i, job in enumerate([
        {"method": "invert", "image": photo, "prompt": "a red square on a white background", "inversion": "ddim",
         "steps": 3},
        {"method": "edit", "image": photo, "source": "a red square on a white background",
         "targets": ["a blue square on a white background"], "inversion": "negative-prompt", "steps": 3,
         "blend": ["red", "blue"], "paste_unedited": True},
    ]):
        folder = tmp_path / f"run{i}"
        _, record = run_to(pipe, parse_request(job), folder)
        assert "batch" not in record["cli"]
        result = invoke_line(record["cli"].replace(str(folder), str(tmp_path / f"cli{i}")))
        assert result.exit_code == 0, result.output
        assert files_under(folder) == files_under(tmp_path / f"cli{i}")
        for png in (p for p in files_under(folder) if p.endswith(".png")):
            assert np.array_equal(pixels(folder / png), pixels(tmp_path / f"cli{i}" / png)), png


def test_an_edit_from_a_saved_inversion_needs_no_second_inversion(pipe, tmp_path, photo):
    prompt = "a red square on a white background"
    run_to(pipe, parse_request({"method": "invert", "image": photo, "prompt": prompt, "inversion": "ddim",
                                "steps": 3}), tmp_path / "inv")
    targets = ["a blue square on a white background"]
    saved, record = run_to(pipe, parse_request({"method": "edit", "source": prompt, "targets": targets,
                                                "image": str(tmp_path / "inv")}), tmp_path / "a")
    fresh, _ = run_to(pipe, parse_request({"method": "edit", "source": prompt, "targets": targets, "image": photo,
                                           "inversion": "ddim", "steps": 3}), tmp_path / "b")
    assert "invert" not in saved.timings and "invert" in fresh.timings and record["reused_inversion"]
    assert np.array_equal(np.asarray(saved.image("01_blue.png")), np.asarray(fresh.image("01_blue.png")))


def test_what_the_cli_cannot_say_runs_through_batch_on_standard_input(pipe, tmp_path):
    request = parse_request({"method": "maps", "prompt": "a red circle", "steps": 3, "window": [0.5, 1.0],
                             "places": ["up"], "seed": 1})
    _, record = run_to(pipe, request, tmp_path / "out" / "m1")
    line = record["cli"]
    echo, command = line.split(" | ")
    job = shlex.split(echo)[1]
    args = shlex.split(command.replace(str(tmp_path / "out"), str(tmp_path / "again")))[1:]
    assert args[:2] == ["batch", "-"]
    result = CliRunner().invoke(app, [*args, "--quiet"], input=job + "\n")
    assert result.exit_code == 0, result.output
    for png in ("image.png", "maps.png"):
        assert np.array_equal(pixels(tmp_path / "out" / "m1" / png), pixels(tmp_path / "again" / "m1" / png))
    whole = parse_request({"method": "maps", "prompt": "a red circle", "steps": 3, "seed": 1})
    windowed = execute(pipe, request, CTX).result["maps"]["red"]
    assert not np.allclose(windowed.numpy(), execute(pipe, whole, CTX).result["maps"]["red"].numpy())


@pytest.mark.parametrize("method", ["generate", "maps"])
def test_batched_runs_equal_runs_alone(pipe, method):
    prompts = ["a red circle", "a blue square on a black background", "a green triangle"]
    requests = [parse_request({"method": method, "prompt": p, "seed": 10 + i, "steps": 3})
                for i, p in enumerate(prompts)]
    assert len({batch_key(pipe, r) for r in requests}) == 1
    together = execute_batch(pipe, requests, CTX)
    alone = [execute(pipe, r, CTX) for r in requests]
    for a, b in zip(alone, together, strict=True):
        assert [n for n, _, _ in a.images] == [n for n, _, _ in b.images]
        for (name, x, _), (_, y, _) in zip(a.images, b.images, strict=True):
            diff = np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int))
            # float32 rounding of a wider batch: at most one grey level, on few pixels
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
        assert a.settings == b.settings
    # the rows really are different jobs: each has its own prompt and noise
    assert not np.array_equal(np.asarray(together[0].images[0][1]), np.asarray(together[1].images[0][1]))


def test_jobs_that_differ_in_steps_or_size_are_not_batched(pipe):
    base = {"method": "generate", "prompt": "a red circle"}
    keys = {batch_key(pipe, parse_request({**base, **extra}))
            for extra in ({}, {"steps": 3}, {"height": 64}, {"guidance": 2.0})}
    assert len(keys) == 4
    assert batch_key(pipe, parse_request({"method": "maps", "prompt": "a cat", "self_at": [1, 1]})) is None
    assert batch_key(pipe, parse_request({"method": "edit", "source": "a cat", "targets": ["a dog"]})) is None
    with pytest.raises(AttnkitError, match="cannot share a batch"):
        execute_batch(pipe, [parse_request({**base, "steps": 2}), parse_request({**base, "steps": 3})], CTX)


def test_model_aware_checks_fail_before_sampling_and_leave_the_pipeline_alone(pipe):
    before = dict(pipe.unet.attn_processors)
    for job, message in [
        ({"method": "maps", "prompt": "a red circle", "words": ["zebra"]}, "'zebra' is not a word"),
        ({"method": "maps", "prompt": "a red circle", "res": 5}, "field 'res'"),
        ({"method": "generate", "prompt": "red " * 80}, "tokens long"),
        ({"method": "edit", "source": "a lemon cake", "targets": ["a lego cake"], "blend": ["zebra"]}, "zebra"),
        ({"method": "edit", "source": "a lemon cake", "targets": ["a lego cake"], "paste_unedited": True},
         "paste_unedited"),
    ]:
        with pytest.raises(AttnkitError, match=message):
            execute(pipe, parse_request(job), CTX)
    assert dict(pipe.unet.attn_processors) == before


def test_a_failed_write_leaves_no_folder(pipe, tmp_path):
    output = execute(pipe, parse_request({"method": "generate", "prompt": "a cat", "steps": 1}), CTX)
    output.writers.append((("broken.bin",), lambda folder: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        with staged_folder(tmp_path / "job") as staging:
            write_output(output, staging, CTX)
    assert list(tmp_path.iterdir()) == []
    with staged_folder(tmp_path / "job") as staging:
        (staging / "x.txt").write_text("done")
    with pytest.raises(AttnkitError, match="never overwritten"):
        with staged_folder(tmp_path / "job"):
            pass


def test_style_with_a_real_reference_equals_its_cli_command_and_gives_the_scheduler_back(pipe, tmp_path, photo):
    scheduler = pipe.scheduler
    job = {"method": "style", "prompts": ["a red square on a white background", "a blue circle"],
           "reference": photo, "steps": 2, "seed": 1}
    output, record = run_to(pipe, parse_request(job), tmp_path / "run")
    assert pipe.scheduler is scheduler  # the run's DDIM scheduler is not left behind
    assert record["real_reference"] and record["reference_image"] == photo
    assert record["files"] == ["grid.png", "input.png", "00_reference.png", "01_a_blue_circle.png", "record.json"]
    result = invoke_line(record["cli"].replace(str(tmp_path / "run"), str(tmp_path / "cli")))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "run") == files_under(tmp_path / "cli")
    for png in (p for p in files_under(tmp_path / "cli") if p.endswith(".png")):
        assert np.array_equal(pixels(tmp_path / "run" / png), pixels(tmp_path / "cli" / png)), png


def test_a_mutual_edit_of_a_real_image_equals_its_cli_command_and_gives_the_scheduler_back(pipe, tmp_path, photo):
    scheduler = pipe.scheduler
    job = {"method": "mutual-edit", "source": "a red square on a white background",
           "targets": ["a red circle on a white background"], "image": photo, "steps": 2, "seed": 1}
    _, record = run_to(pipe, parse_request(job), tmp_path / "run")
    assert pipe.scheduler is scheduler
    assert record["real_reference"] and record["image"] == photo
    assert record["files"] == ["grid.png", "input.png", "00_source.png", "01_circle.png", "record.json"]
    result = invoke_line(record["cli"].replace(str(tmp_path / "run"), str(tmp_path / "cli")))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "run") == files_under(tmp_path / "cli")
    for png in (p for p in files_under(tmp_path / "cli") if p.endswith(".png")):
        assert np.array_equal(pixels(tmp_path / "run" / png), pixels(tmp_path / "cli" / png)), png


def test_shared_attention_jobs_are_checked_before_sampling(pipe):
    before = dict(pipe.unet.attn_processors)
    for job, message in [
        ({"method": "style", "prompts": ["a red circle"]}, "at least 2 prompts"),
        ({"method": "style", "prompts": "a red circle, a blue square"}, "at least 2 prompts"),  # one prompt
        ({"method": "style", "prompts": ["a cat", "a dog"], "style": " "}, "'style' is empty"),
        ({"method": "style", "prompts": ["a cat", "a dog"], "only_self_level": 1.5}, "only_self_level"),
        ({"method": "consistent", "prompts": ["a cat", "a dog"], "subject": "cat"}, "not a word of the prompt"),
        ({"method": "consistent", "prompts": ["a cat", "a cat"], "subject": "cat", "mask_dropout": 1},
         "mask_dropout"),
        ({"method": "consistent", "prompts": ["a cat", "a cat"]}, "field 'subject': is required"),
        ({"method": "mutual-edit", "source": "a cat"}, "field 'targets': is required"),
        ({"method": "mutual-edit", "source": "a cat", "targets": ["a dog"], "mask_words": ["cat"]},
         "not a word of the prompt 'a dog'"),
        ({"method": "mutual-edit", "source": "a cat", "targets": ["a dog"], "start_step": 1.5}, "start_step"),
        ({"method": "mutual-edit", "source": "a cat", "targets": ["a dog"], "start_layer": 40}, "start_layer=40"),
    ]:
        with pytest.raises(AttnkitError, match=message):
            execute(pipe, parse_request(job), CTX)
    assert dict(pipe.unet.attn_processors) == before


def test_a_transfer_from_a_real_image_equals_its_cli_command_and_bad_inputs_fail_first(pipe, tmp_path, photo):
    job = {"method": "transfer", "structure": photo, "appearance": "a blue circle", "prompt": "a red square",
           "steps": 1, "seed": 2, "masks": "none"}
    _, record = run_to(pipe, parse_request(job), tmp_path / "run")
    assert record["transfer"]["kinds"] == {"structure": "image", "appearance": "prompt"}
    result = invoke_line(record["cli"].replace(str(tmp_path / "run"), str(tmp_path / "cli")))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "run") == files_under(tmp_path / "cli")
    for png in (p for p in files_under(tmp_path / "cli") if p.endswith(".png")):
        assert np.array_equal(pixels(tmp_path / "run" / png), pixels(tmp_path / "cli" / png)), png
    before = dict(pipe.unet.attn_processors)
    for extra, message in [
        ({"structure": str(tmp_path / "missing.png")}, "looks like an image file, and there is none"),
        ({"prompt": None}, "field 'prompt' is missing"),
        ({"masks": "attention", "object_words": ["zebra"]}, "no object word for the structure"),
        ({"skip": 1.0}, "field 'skip'"),
        ({"appearance": "blue " * 80}, "tokens long"),
    ]:
        with pytest.raises(AttnkitError, match=message):
            execute(pipe, parse_request({**job, **extra}), CTX)
    assert dict(pipe.unet.attn_processors) == before
