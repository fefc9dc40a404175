"""The Concepts and Stable Flow tabs through their run functions, on a tiny SD3 pipeline (and refused on a
UNet), and the app builds with them."""

from pathlib import Path

import gradio as gr
import pytest

from attnkit.app.server import build_app
from attnkit.app.tabs.concepts import run_concepts
from attnkit.app.tabs.stable_flow import run_stable_flow
from attnkit.app.workspace import Workspace, friendly
from attnkit.runs import RunContext, load_model


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny-sd3")


@pytest.fixture
def ws(pipe, tmp_path):
    return Workspace(pipe, tmp_path / "app", RunContext(model="tiny-sd3"))


def test_concepts_tab_maps_a_generated_and_an_uploaded_image(ws, png_bytes, record_of):
    strip, segments, files, cli, session = run_concepts(ws, None, None, "a red cat wearing sunglasses",
                                                        "cat, sunglasses", "", 0.5, 1, 2, 5.0)
    names = sorted(Path(f).name for f in files)
    assert names == ["00_cat.png", "01_sunglasses.png", "concepts.png", "image.png", "record.json", "segments.png"]
    assert record_of(files)["concepts"] == ["cat", "sunglasses"] and strip.width > segments.width / 2
    assert cli.startswith("attnkit concepts 'a red cat wearing sunglasses' --concept cat --concept sunglasses")
    _, _, files, _, _ = run_concepts(ws, session, png_bytes(), "a red cat", "cat, background", "-1", 0.4, 0, 2, 5.0)
    record = record_of(files)
    assert record["settings"]["real_image"] and record["settings"]["noise_level"] == 0.4
    with pytest.raises(gr.Error, match="concepts.*is empty"):
        friendly(run_concepts)(ws, None, None, "a red cat", " , ", "", 0.5, 0, 2, 5.0)


def test_stable_flow_tab_edits_with_named_or_vital_layers(ws, record_of):
    grid, files, cli, _ = run_stable_flow(ws, None, None, "a red cat", "a blue cat", "transformer_blocks.0", None,
                                          1, 2, 5.0)
    assert record_of(files)["layers"] == ["transformer_blocks.0"] and grid.width > grid.height
    assert cli.startswith("attnkit stable-flow 'a red cat' --to 'a blue cat' --layer transformer_blocks.0")
    _, files, _, _ = run_stable_flow(ws, None, None, "a red cat", "a blue cat", "", 2, 1, 2, 5.0)
    assert len(record_of(files)["layers"]) == 2 and any(f.endswith("vital_layers.json") for f in files)
    with pytest.raises(gr.Error, match="not a block"):
        friendly(run_stable_flow)(ws, None, None, "a red cat", "a blue cat", "nope", None, 1, 2, 5.0)


def test_tabs_refuse_a_unet_and_the_app_builds(tmp_path):
    unet = load_model("tiny")
    ws = Workspace(unet, tmp_path / "app", RunContext(model="tiny"))
    with pytest.raises(gr.Error, match="MM-DiT"):
        friendly(run_concepts)(ws, None, None, "a red circle", "circle", "", 0.5, 0, 2, 5.0)
    with pytest.raises(gr.Error, match="MM-DiT"):
        friendly(run_stable_flow)(ws, None, None, "a red circle", "a blue circle", "", None, 0, 2, 5.0)
    demo, _ = build_app(unet, tmp_path / "served", RunContext(model="tiny"))
    assert demo is not None
