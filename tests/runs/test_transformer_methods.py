"""The ``concepts`` and ``stable-flow`` runs equal the CLI commands their records name (same files, same
pixels), and are checked before anything samples."""

import json
import shlex

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit import AttnkitError
from attnkit.cli import app
from attnkit.runs import RunContext, check, execute, load_model, parse_request, staged_folder, write_output
from attnkit.runs.transformer_methods import parse_blocks

CTX = RunContext(model="tiny-sd3", device="cpu")
JOBS = {
    "concepts": {"method": "concepts", "prompt": "a red cat wearing sunglasses", "concepts": ["cat", "sunglasses"],
                 "blocks": "0,-1", "seed": 3, "steps": 2},
    "stable-flow": {"method": "stable-flow", "source": "a red cat", "targets": ["a blue cat"], "vital": 1,
                    "seed": 2, "steps": 2},
}


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny-sd3")


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("name", list(JOBS))
def test_a_run_equals_the_cli_command_in_its_record(pipe, tmp_path, name):
    request = parse_request(JOBS[name])
    output = execute(pipe, request, CTX)
    runs = tmp_path / "runs"
    with staged_folder(runs) as staging:
        record = write_output(output, staging, CTX, out=runs)
    assert record["cli"].startswith(f"attnkit {name} ") and "batch" not in record["cli"]
    cli_out = tmp_path / "cli"
    args = shlex.split(record["cli"].replace(str(runs), str(cli_out)))
    result = CliRunner().invoke(app, args[1:] + ["--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert files_under(runs) == files_under(cli_out)
    cli_record = json.loads((cli_out / "record.json").read_text())
    for key in ("command", "prompt", "model", "seed", "steps", "guidance", "height", "width", "files", "layers"):
        assert record.get(key) == cli_record.get(key), key
    for png in (p for p in files_under(cli_out) if p.endswith(".png")):
        assert np.array_equal(pixels(runs / png), pixels(cli_out / png)), png


def test_checks_fail_before_sampling():
    unet = load_model("tiny")
    with pytest.raises(AttnkitError, match="MM-DiT"):
        check(unet, parse_request({"method": "concepts", "prompt": "a cat", "concepts": ["cat"]}))
    sd3 = load_model("tiny-sd3")
    with pytest.raises(AttnkitError, match="not a block"):
        check(sd3, parse_request({"method": "stable-flow", "source": "a cat", "targets": ["a dog"],
                                  "layers": ["nope"]}))
    with pytest.raises(AttnkitError, match="blocks"):
        parse_blocks("a,b")
    assert parse_blocks("15, 16,-1") == [15, 16, -1]
