"""The Flow edit tab through its run function, on a tiny FLUX pipeline (and refused on a UNet), and the app
builds with it."""


import gradio as gr
import pytest

from attnkit.app.server import build_app
from attnkit.app.tabs.flow_edit import run_flow_edit
from attnkit.app.workspace import Workspace, friendly
from attnkit.runs import RunContext, load_model

SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny-flux")


@pytest.fixture
def ws(pipe, tmp_path):
    return Workspace(pipe, tmp_path / "app", RunContext(model="tiny-flux"))


def test_inversion_and_flowedit_modes(ws, png_bytes, record_of):
    grid, rebuilt, files, cli, session = run_flow_edit(ws, None, png_bytes(), "Inversion + regeneration", SOURCE,
                                                       TARGET, "fireflow", 2, None, 0)
    record = record_of(files)
    assert record["solver"] == "fireflow" and record["evaluations"] == {"invert": 3, "reconstruct": 3, "edit": 3}
    assert rebuilt.size == (32, 32) and grid.width > grid.height and cli.startswith("attnkit rf-invert ")
    grid, rebuilt, files, cli, _ = run_flow_edit(ws, session, png_bytes(), "FlowEdit (no inversion)", SOURCE,
                                                 TARGET, "euler", 3, 4.0, 1)
    record = record_of(files)
    assert rebuilt is None and record["target_guidance"] == 4.0 and record["seed"] == 1
    assert cli.startswith("attnkit flow-edit ")
    with pytest.raises(gr.Error, match="no image"):
        friendly(run_flow_edit)(ws, None, None, "FlowEdit (no inversion)", SOURCE, TARGET, "euler", 2, None, 0)


def test_a_unet_is_refused_and_the_app_builds(tmp_path, png_bytes):
    unet = load_model("tiny")
    ws = Workspace(unet, tmp_path / "app", RunContext(model="tiny"))
    with pytest.raises(gr.Error, match="attnkit.invert"):
        friendly(run_flow_edit)(ws, None, png_bytes(), "FlowEdit (no inversion)", SOURCE, TARGET, "euler", 2, None, 0)
    demo, _ = build_app(unet, tmp_path / "served", RunContext(model="tiny"))
    assert demo is not None
