"""`attnkit style`, `attnkit consistent` and `attnkit mutual-edit` end to end: the files they promise, record.json,
clean failures."""

import json

from PIL import Image
from typer.testing import CliRunner

from attnkit import read_png_metadata
from attnkit.cli import app

FAST = ["--steps", "2", "--threads", "1", "--quiet", "--device", "cpu", "--model", "tiny"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_style_writes_grid_images_and_record(tmp_path):
    out = tmp_path / "style"
    result = invoke("style", "a red circle", "a blue square", "a cat", "--style", "photo", "--shift", "0.5",
                    "--seed", "4", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_reference.png", "01_a_blue_square_photo.png", "02_a_cat_photo.png", "grid.png",
                                "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "style" and record["method"] == "style_aligned"
    assert record["prompts"] == ["a red circle, photo", "a blue square, photo", "a cat, photo"]
    assert (record["seed"], record["steps"], record["shift"], record["references"]) == (4, 2, 0.5, [0])
    assert read_png_metadata(out / "02_a_cat_photo.png")["image_prompt"] == "a cat, photo"
    with Image.open(out / "grid.png") as grid, Image.open(out / "00_reference.png") as ref:
        assert grid.width > 2 * ref.width and grid.height > ref.height  # three tiles, captions under them


def test_style_with_a_real_reference_writes_the_input(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (20, 200, 40)).save(photo)
    out = tmp_path / "transfer"
    result = invoke("style", "a green square", "a red circle", "--reference", photo, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "input.png" in files_under(out)
    record = json.loads((out / "record.json").read_text())
    assert record["real_reference"] is True and record["reference_image"] == str(photo)


def test_consistent_writes_grid_and_record(tmp_path):
    out = tmp_path / "consistent"
    result = invoke("consistent", "a cat", "a cat on a field", "--subject", "cat", "--mask-dropout", "0.3", *FAST,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_reference.png", "01_a_cat_on_a_field.png", "grid.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "consistent" and record["subject"] == "cat" and record["mask_dropout"] == 0.3


def test_mutual_edit_writes_grid_source_edits_and_record(tmp_path):
    out = tmp_path / "masa"
    result = invoke("mutual-edit", "a red circle", "--to", "a red square", "--to", "a red triangle",
                    "--start-step", "1", "--start-layer", "0.5", "--mask-word", "red", "--seed", "3", *FAST,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_source.png", "01_square.png", "02_triangle.png", "grid.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "mutual-edit" and record["method"] == "mutual_edit" and record["shared_noise"]
    assert record["prompts"] == ["a red circle", "a red square", "a red triangle"]
    assert (record["start_step"], record["start_layer"], record["mask_words"]) == (1, 0.5, "red")
    assert read_png_metadata(out / "01_square.png")["image_prompt"] == "a red square"
    with Image.open(out / "grid.png") as grid, Image.open(out / "00_source.png") as source:
        assert grid.width > 2 * source.width and grid.height > source.height


def test_mutual_edit_of_a_real_image_writes_the_input(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (20, 200, 40)).save(photo)
    out = tmp_path / "real"
    result = invoke("mutual-edit", "a green square", "--to", "a green circle", "--image", photo, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_source.png", "01_circle.png", "grid.png", "input.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["real_reference"] is True and record["image"] == str(photo) and record["start_step"] == 4


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = [
        (["style", "a red circle"], "at least 2 prompts"),
        (["style", "a cat", "a dog", "--reference", tmp_path / "missing.png"], "does not exist"),
        (["style", "a cat", "a dog", "--reference", broken], "is not an image PIL can read"),
        (["style", "a cat", "a dog", "--only-self-level", "1.5"], "--only-self-level"),
        (["consistent", "a cat", "a dog", "--subject", "cat"], "not a word of the prompt 'a dog'"),
        (["consistent", "a cat", "a cat", "--subject", "cat", "--mask-dropout", "1"], "--mask-dropout"),
        (["mutual-edit", "a cat"], "Missing option '--to'"),
        (["mutual-edit", "a cat", "--to", "a dog", "--mask-word", "cat"], "not a word of the prompt 'a dog'"),
        (["mutual-edit", "a cat", "--to", "a dog", "--mask-word", "cat", "--mask-word", "dog", "--mask-word", "x"],
         "one per prompt (2"),
        (["mutual-edit", "a cat", "--to", "a dog", "--start-step", "2.5"], "--start-step 2.5"),
        (["mutual-edit", "a cat", "--to", "a dog", "--start-layer", "-1"], "--start-layer -1"),
        (["mutual-edit", "a cat", "--to", "a dog", "--start-layer", "99"], "start_layer=99"),
        (["mutual-edit", "a cat", "--to", "a dog", "--image", tmp_path / "missing.png"], "does not exist"),
        (["mutual-edit", "a cat", "--to", "a dog", "--mask-threshold", "2"], "--mask-threshold"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = invoke(*args, *FAST, "--out", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists()
