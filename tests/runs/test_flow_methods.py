"""rf-invert and flow-edit as runs: each equals the CLI command its record names (same files, same pixels), and
a UNet is refused with the pointer to attnkit.invert."""

import json
import shlex

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit import AttnkitError
from attnkit.cli import app
from attnkit.runs import RunContext, execute, load_model, parse_request, staged_folder, write_output

CTX = RunContext(model="tiny-flux", device="cpu")
SOURCE, TARGET = "a red square on a white background", "a blue square on a white background"


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny-flux")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    image = np.full((40, 48, 3), 250, np.uint8)
    image[10:30, 12:36] = (220, 30, 30)
    Image.fromarray(image).save(path)
    return str(path)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("job", [
    {"method": "rf-invert", "prompt": SOURCE, "targets": [TARGET], "solver": "rf-solver", "steps": 2,
     "edit_guidance": 2.0},
    {"method": "flow-edit", "source": SOURCE, "target": TARGET, "steps": 3, "n_max": 2, "seed": 4,
     "target_guidance": 4.0},
])
def test_a_run_equals_the_cli_command_in_its_record(pipe, photo, tmp_path, job):
    folder = tmp_path / "run"
    output = execute(pipe, parse_request({**job, "image": photo}), CTX)
    with staged_folder(folder) as staging:
        record = write_output(output, staging, CTX, out=folder)
    assert record["cli"].startswith(f"attnkit {job['method']} ") and "batch" not in record["cli"]
    args = shlex.split(record["cli"].replace(str(folder), str(tmp_path / "cli")))
    result = CliRunner().invoke(app, args[1:] + ["--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert files_under(folder) == files_under(tmp_path / "cli") and "grid.png" in files_under(folder)
    cli_record = json.loads((tmp_path / "cli" / "record.json").read_text())
    for key in ("command", "prompt", "steps", "evaluations", "targets", "files"):
        assert record.get(key) == cli_record.get(key), key
    for png in (p for p in files_under(folder) if p.endswith(".png")):
        assert np.array_equal(pixels(folder / png), pixels(tmp_path / "cli" / png)), png


def test_a_unet_is_refused_before_anything_runs(photo):
    from attnkit.runs.execute import check

    unet = load_model("tiny")
    with pytest.raises(AttnkitError, match="attnkit.invert"):
        check(unet, parse_request({"method": "flow-edit", "image": photo, "source": SOURCE, "target": TARGET}))
    with pytest.raises(AttnkitError, match="give targets as well"):
        check(unet, parse_request({"method": "rf-invert", "image": photo, "prompt": SOURCE, "edit_guidance": 2.0}))
