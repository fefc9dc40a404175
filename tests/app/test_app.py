"""The web app through its Blocks functions and its HTTP API: every tab's outputs as promised, errors as
messages, sessions kept apart, cancel, upload limits."""

import io
import socket
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from attnkit import AttnkitError, read_png_metadata
from attnkit.app.server import build_app, launch
from attnkit.app.tabs.edit import run_edit
from attnkit.app.tabs.maps import run_maps, self_attention_at
from attnkit.app.tabs.real_image import load_inversion, run_invert, run_real_edit
from attnkit.app.tabs.segment import run_segment
from attnkit.app.uploads import decode_image
from attnkit.app.workspace import Cancelled, Session, Workspace, cancellable, friendly
from attnkit.runs import RunContext, load_model

PLACES = ["down", "mid", "up"]


@pytest.fixture(scope="module")
def pipe():
    return load_model("tiny")


@pytest.fixture
def ws(pipe, tmp_path):
    return Workspace(pipe, tmp_path / "app", RunContext(model="tiny"))


def test_maps_tab_gives_image_word_maps_downloads_and_the_cli_line(ws, record_of):
    image, words, files, cli, session = run_maps(ws, None, "a red circle and a blue square", 3, 2, 7.5, "16",
                                                 PLACES, 0.0, 1.0)
    assert [w for _, w in words] == ["a", "red", "circle", "and", "blue", "square"]  # each word once, in order
    folder = ws.out / session.id
    for path in [p for p, _ in words] + files:
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(folder)
    record = record_of(files)
    assert record["command"] == "maps" and record["seed"] == 3 and record["res"] == 16
    assert cli == record["cli"] and cli.startswith("attnkit maps 'a red circle and a blue square' --seed 3")
    assert read_png_metadata(next(f for f in files if f.endswith("image.png")))["prompt"] == record["prompt"]
    attends = self_attention_at(session, image.width / 2, image.height / 2, image.size)
    assert attends.size == image.size
    corner = np.asarray(self_attention_at(session, 1, 1, image.size))
    assert not np.array_equal(corner, np.asarray(attends))  # another pixel attends elsewhere
    with pytest.raises(AttnkitError, match="run Maps first"):
        self_attention_at(Session(), 1, 1, (64, 64))


def test_maps_tab_step_window_and_layers_reach_the_run(ws, record_of):
    _, _, files, cli, _ = run_maps(ws, None, "a red circle", 0, 4, 7.5, "16", ["up"], 0.5, 1.0)
    record = record_of(files)
    assert record["window"] == [0.5, 1.0] and record["places"] == ["up"]
    assert "attnkit batch -" in cli  # the CLI has no window option: the same job through attnkit batch


def test_edit_tab_makes_a_captioned_grid(ws, record_of):
    grid, files, cli, session = run_edit(ws, None, "a lemon cake", "a chocolate cake\na lego cake", "auto", 0.8,
                                         0.4, 16, "lego=2", "cake", 0.3, 8888, 2, 7.5)
    names = sorted(Path(f).name for f in files)
    assert names == ["00_source.png", "01_chocolate.png", "02_lego.png", "grid.png", "record.json"]
    assert grid.width > grid.height  # three images side by side, captions under them
    record = record_of(files)
    assert record["targets"] == ["a chocolate cake", "a lego cake"] and record["reweight"] == {"lego": 2.0}
    assert "--reweight lego=2" in cli and "--blend cake" in cli


def test_errors_become_messages_in_the_page(ws):
    wrapped = friendly(run_edit)
    with pytest.raises(gr.Error, match="zebra"):
        wrapped(ws, None, "a lemon cake", "a lego cake", "auto", 0.8, 0.4, 16, "zebra=2", "", 0.3, 0, 2, 7.5)
    with pytest.raises(gr.Error, match="field 'targets': is empty"):
        wrapped(ws, None, "a lemon cake", "", "auto", 0.8, 0.4, 16, "", "", 0.3, 0, 2, 7.5)
    with pytest.raises(gr.Error, match="limit is 500"):
        friendly(run_maps)(ws, None, "red " * 200, 0, 2, 7.5, "16", PLACES, 0, 1)
    with pytest.raises(gr.Error, match="unexpected error \\(ZeroDivisionError\\)"):
        friendly(lambda: 1 / 0)()


def test_real_image_tab_inverts_once_and_edits_again_and_again(ws, png_bytes, record_of):
    outputs = run_invert(ws, None, png_bytes(), "a red square on a white background", "ddim", 3, 7.5, 10)
    fitted, rebuilt, status, archive, files, cli, session = outputs
    assert fitted.size == rebuilt.size and "PSNR" in status
    assert cli.startswith("attnkit invert ") and "--method ddim" in cli
    uploads = list((ws.out / session.id / "uploads").iterdir())
    assert len(uploads) == 1 and len(uploads[0].stem) == 32  # a generated name, not the browser's
    grids = []
    for target in ["a blue square on a white background", "a green square on a white background"]:
        grid, files, cli, session = run_real_edit(ws, session, target, 0.8, 0.5, "", False)
        record = record_of(files)
        assert record["reused_inversion"] and "invert" not in record["timings"]  # no second inversion
        assert f"--image {session.inversion_dir}" in cli
        grids.append(np.asarray(grid))
    assert grids[0].shape == grids[1].shape and not np.array_equal(grids[0], grids[1])
    other = Session()  # the downloaded inversion, uploaded in another session, edits the same way
    picture, message, other = load_inversion(ws, other, Path(archive).read_bytes())
    assert "a red square on a white background" in message and picture.size == fitted.size
    again, _, _, _ = run_real_edit(ws, other, "a green square on a white background", 0.8, 0.5, "", False)
    assert np.array_equal(np.asarray(again), grids[1])


def test_real_image_tab_refuses_bad_uploads(ws):
    with pytest.raises(AttnkitError, match="invert an image first"):
        run_real_edit(ws, Session(), "a blue square", 0.8, 0.5, "", False)
    with pytest.raises(AttnkitError, match="not an image"):
        decode_image(b"GIF89a but not really")
    with pytest.raises(AttnkitError, match="no image uploaded"):
        decode_image(None)
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # ~10 kB that decodes to 64 megapixels
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(AttnkitError, match="8000x8000 pixels; the limit"):
        decode_image(bomb.getvalue())
    with pytest.raises(AttnkitError, match="not a zip file"):
        load_inversion(ws, Session(), b"plain text")
    fake = io.BytesIO()
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("../../evil.json", "{}")
    with pytest.raises(AttnkitError, match="has no inversion.safetensors"):
        load_inversion(ws, Session(), fake.getvalue())
    assert not list(ws.out.rglob("evil.json"))


def test_cancel_stops_a_run_writes_nothing_and_restores_the_pipeline(ws, pipe):
    before = dict(pipe.unet.attn_processors)
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled), cancellable(pipe, flag):
        pipe("a cat", num_inference_steps=2)
    session = Session()

    def cancel_once_running():
        while not ws.lock.locked():
            time.sleep(0.01)
        ws.cancel(session)

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    with pytest.raises(Cancelled):
        run_maps(ws, session, "a red circle", 0, 200, 7.5, "16", PLACES, 0, 1)
    canceller.join()
    assert not (ws.out / session.id).exists() or not list((ws.out / session.id).iterdir())  # nothing written
    assert dict(pipe.unet.attn_processors) == before
    run_maps(ws, session, "a red circle", 0, 2, 7.5, "16", PLACES, 0, 1)  # the next run is not cancelled


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_served_app_keeps_sessions_apart_and_errors_as_messages(pipe, tmp_path):
    from gradio_client import Client

    demo, ws = build_app(pipe, tmp_path / "app", RunContext(model="tiny"))
    port = free_port()
    launch(demo, ws, port=port, block=False, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        a = first.predict("a red circle", 1, 2, 7.5, "16", PLACES, 0, 1, api_name="/maps")
        b = second.predict("a blue square", 2, 2, 7.5, "16", PLACES, 0, 1, api_name="/maps")
        folders = {Path(line.split("--out ")[1]).parent.name for line in (a[3], b[3])}
        assert len(folders) == 2  # each session writes under its own folder
        with pytest.raises(Exception, match="zebra") as caught:
            first.predict("a lemon cake", "a lego cake", "auto", 0.8, 0.4, 16, "zebra=2", "", 0.3, 0, 2, 7.5,
                          api_name="/edit")
        assert "Traceback" not in str(caught.value)
        again = first.predict("a lemon cake", "a lego cake", "auto", 0.8, 0.4, 16, "", "", 0.3, 0, 2, 7.5,
                              api_name="/edit")
        assert again[2].startswith("attnkit edit 'a lemon cake' --to 'a lego cake'")
        assert demo.server_name == "127.0.0.1"
    finally:
        demo.close()


def test_the_served_app_keeps_at_most_max_sessions_and_no_flags_of_ended_runs(pipe, tmp_path):
    from gradio_client import Client

    demo, ws = build_app(pipe, tmp_path / "app", RunContext(model="tiny"))
    port = free_port()
    launch(demo, ws, port=port, block=False, quiet=True, max_sessions=2)
    try:
        url = f"http://127.0.0.1:{port}/"
        for k in range(4):  # four sessions, one request each: the two oldest are pushed out
            Client(url, verbose=False).predict("a red circle", k, 2, 7.5, "16", PLACES, 0, 1, api_name="/maps")
            assert len(demo.state_holder.session_data) == min(k + 1, 2)
        assert ws.flags == {}  # a run's cancel flag lives only while it runs
    finally:
        demo.close()


def test_launch_and_the_command_agree_on_the_session_limit_and_refuse_zero(pipe, tmp_path):
    import inspect

    from attnkit.app import server
    from attnkit.app.command import app_command

    assert inspect.signature(app_command).parameters["max_sessions"].default == server.MAX_SESSIONS
    demo, ws = build_app(pipe, tmp_path / "app", RunContext(model="tiny"))
    with pytest.raises(AttnkitError, match="at least one session"):
        launch(demo, ws, port=free_port(), block=False, quiet=True, max_sessions=0)


def test_segment_tab_labels_segments_of_a_generated_and_an_uploaded_image(ws, png_bytes, record_of):
    overlay, legend, files, cli, session = run_segment(ws, None, None, "a red circle and a blue square", "merge",
                                                       3, 0.3, "bilateral", 4, 2, 7.5)
    names = sorted(Path(f).name for f in files)
    assert names == ["image.png", "labels.png", "overlay.png", "record.json"]
    record = record_of(files)
    assert record["command"] == "segment" and record["settings"]["method"] == "merge"
    assert legend.splitlines() == [
        f"{s['index']} – {s['label']}" + ("" if s["label"] == "background" else f" {s['score']:.2f}")
        + ("" if s["area"] > 0 else " (empty)") for s in record["segments"]]
    image = Image.open(next(f for f in files if f.endswith("image.png")))
    assert overlay.width > image.width  # the legend sits beside the image
    assert cli.startswith("attnkit segment --prompt 'a red circle and a blue square' --method merge")
    _, _, files, _, _ = run_segment(ws, session, png_bytes(), "a red square", "kmeans", None, 0.4, "none", 0, 2,
                                    7.5)
    record = record_of(files)
    assert record["image"].startswith(str(ws.folder(session) / "uploads"))  # a generated name, not the upload's
    assert record["settings"]["real"] == "noise"
    with pytest.raises(gr.Error, match="segments"):
        friendly(run_segment)(ws, None, None, "a red square", "kmeans", 1, 0.4, "none", 0, 2, 7.5)


def test_style_tab_makes_a_grid_in_either_mode_and_refuses_one_prompt(ws, record_of):
    from attnkit.app.tabs.style import run_style

    style = ["Style Aligned", "a red circle\n\na blue square\na green triangle", "outlined", 0.69, 1.0, True,
             "off", 0.0, "", 0.5, 3, 2, 7.5]
    grid, files, cli, session = run_style(ws, None, *style)
    names = [Path(f).name for f in files]
    assert names == ["grid.png", "00_reference.png", "01_a_blue_square_outlined.png",
                     "02_a_green_triangle_outlined.png", "record.json"]  # the empty line is no prompt
    record = record_of(files)
    assert record["command"] == "style" and record["prompts"][0] == "a red circle, outlined"
    assert record["shift"] == 0.69 and record["adain_values"] and record["share_group_norm"] is False
    reference = Image.open(next(f for f in files if f.endswith("00_reference.png")))
    assert grid.width >= 3 * reference.width and grid.height > reference.height  # three tiles, captions under
    assert cli.startswith("attnkit style 'a red circle' 'a blue square' 'a green triangle' --style outlined")
    assert "--shift 0.69 --adain-values --no-group-norm" in cli
    consistent = ["ConsiStory (subject)", "a red circle\na circle on a black background", "ignored", 0, 1, False,
                  "off", 0, "circle", 0.3, 5, 2, 7.5]
    _, files, cli, again = run_style(ws, session, *consistent)
    record = record_of(files)
    assert again is session and record["command"] == "consistent" and record["subject"] == "circle"
    assert cli.startswith("attnkit consistent 'a red circle' 'a circle on a black background' --subject circle")
    assert "--style" not in cli and record["mask_dropout"] == 0.3
    with pytest.raises(gr.Error, match="at least 2 prompts"):
        friendly(run_style)(ws, None, "Style Aligned", "a red circle\n", "", 0, 1, False, "off", 0, "", 0.5, 0, 2,
                            7.5)
    with pytest.raises(gr.Error, match="not a word of the prompt 'a blue square'"):
        friendly(run_style)(ws, None, *consistent[:1], "a red circle\na blue square", *consistent[2:])


def test_style_tab_runs_masactrl_edits_from_the_first_prompt(ws, record_of):
    from attnkit.app.tabs.style import run_style

    masa = ["MasaCtrl (edit)", "a red circle\na red square\na red diamond", "ignored", 0.5, 1.0, False, "off", 0,
            "ignored", 0.5, 2, 2, 7.5, 1, 0.5, "red"]
    grid, files, cli, _ = run_style(ws, None, *masa)
    names = [Path(f).name for f in files]
    assert names == ["grid.png", "00_source.png", "01_square.png", "02_diamond.png", "record.json"]
    record = record_of(files)
    assert record["command"] == "mutual-edit" and record["prompts"] == masa[1].splitlines()
    assert (record["start_step"], record["start_layer"], record["mask_words"]) == (1, 0.5, "red")
    assert cli.startswith("attnkit mutual-edit 'a red circle' --to 'a red square' --to 'a red diamond'")
    assert "--mask-word red" in cli and "--style" not in cli and "--shift" not in cli
    source = Image.open(next(f for f in files if f.endswith("00_source.png")))
    assert grid.width >= 3 * source.width
    with pytest.raises(gr.Error, match="at least 2 prompts"):
        friendly(run_style)(ws, None, masa[0], "a red circle", *masa[2:])
    with pytest.raises(gr.Error, match="not a word of the prompt 'a red square'"):
        friendly(run_style)(ws, None, *masa[:-1], "circle")


def test_transfer_tab_takes_a_prompt_and_an_upload_and_refuses_what_it_cannot_run(ws, png_bytes, record_of):
    from attnkit.app.tabs.transfer import run_transfer

    strip, files, cli, session = run_transfer(ws, None, None, "a red circle", png_bytes(), "", "a red circle",
                                              1.5, 2.0, False, 1, 3)
    assert [Path(f).name for f in files] == ["strip.png", "output.png", "structure.png",
                                             "structure_reconstructed.png", "appearance.png",
                                             "appearance_reconstructed.png", "record.json"]
    record = record_of(files)
    upload = Path(record["appearance"])
    assert upload.parent == ws.folder(session) / "uploads" and len(upload.stem) == 32  # a generated name
    assert record["command"] == "transfer" and record["structure"] == "a red circle" and record["seed"] == 3
    settings = record["transfer"]
    assert settings["kinds"] == {"structure": "prompt", "appearance": "image"}
    assert (settings["contrast"], settings["swap_guidance"], settings["adain"], settings["steps"]) == (1.5, 2.0,
                                                                                                      False, 1)
    output = Image.open(next(f for f in files if f.endswith("/output.png")))
    assert strip.size == (3 * output.width, output.height)  # structure | appearance | output
    assert np.array_equal(np.asarray(strip)[:, 2 * output.width:], np.asarray(output.convert("RGB")))
    assert cli == record["cli"] and cli.startswith(f"attnkit transfer --structure 'a red circle' --appearance "
                                                   f"{upload} --prompt 'a red circle' --steps 1 --contrast 1.5 "
                                                   "--swap-guidance 2 --no-adain --seed 3")
    wrapped = friendly(run_transfer)
    with pytest.raises(gr.Error, match="the appearance is empty"):
        wrapped(ws, None, None, "a red circle", None, " ", "", 1.67, 3.5, True, 1, 0)
    with pytest.raises(gr.Error, match="looks like a file name"):  # a typed path is never read on the server
        wrapped(ws, None, None, "a red circle", None, str(upload), "", 1.67, 3.5, True, 1, 0)
    with pytest.raises(gr.Error, match="field 'prompt' is missing"):
        wrapped(ws, None, png_bytes(), "", None, "a blue square", "", 1.67, 3.5, True, 1, 0)
    with pytest.raises(gr.Error, match="swap_guidance"):
        wrapped(ws, None, None, "a red circle", None, "a blue square", "", 1.67, 0.5, True, 1, 0)


def test_freed_memory_goes_back_to_the_system_where_the_c_library_can():
    import platform

    from attnkit.app.workspace import _malloc_trim, return_freed_memory

    if platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None  # glibc: malloc_trim found, called after every run
    return_freed_memory()  # elsewhere a no-op, never an error
