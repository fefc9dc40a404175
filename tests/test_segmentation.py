"""attnkit.segment: clustering, labelling, upsampling, the real-image paths, bad input, and the CLI command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import attnkit
from attnkit import AttentionStore, AttnkitError, generate
from attnkit import segmentation as S
from attnkit.cli import app
from attnkit.testing import tiny_pipeline

PROMPT = "a red circle and a blue square on a white background"


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline("sd")


def processors(pipe):
    return {name: type(p) for name, p in pipe.unet.attn_processors.items()}


# -- the algorithms on synthetic attention ---------------------------------------------------------------
def block_attention(side=8, split=3):
    """Rows of pixels left of column ``split`` attend (uniformly) to the left part, the others to the right."""
    left = torch.zeros(side, side, dtype=torch.bool)
    left[:, :split] = True
    rows = []
    for inside in left.flatten():
        part = (left if inside else ~left).flatten().float()
        rows.append(0.9 * part / part.sum() + 0.1 / side**2)
    return torch.stack(rows), left


def test_kmeans_finds_the_blocks():
    attention, left = block_attention()
    labels = S.kmeans_segments(attention, 2).reshape(8, 8)
    assert len(np.unique(labels[left.numpy()])) == 1 and len(np.unique(labels[~left.numpy()])) == 1
    assert labels[0, 0] != labels[0, -1]


def test_merge_needs_no_count_and_honours_a_cap():
    attention, left = block_attention()
    labels = S.merge_segments(attention, (8, 8), threshold=0.5).reshape(8, 8)
    assert len(np.unique(labels)) == 2
    assert len(np.unique(labels[left.numpy()])) == 1
    # a tiny threshold leaves every anchor its own proposal; the cap merges the closest until 3 remain
    capped = S.merge_segments(attention + 1e-3 * torch.rand(64, 64), (8, 8), threshold=1e-9, n_segments=3)
    assert len(np.unique(capped)) <= 3


def test_symmetric_kl_matches_the_definition():
    x, y = torch.rand(3, 5).softmax(1).double(), torch.rand(4, 5).softmax(1).double()
    expected = torch.tensor([[0.5 * float((a * (a / b).log()).sum() + (b * (b / a).log()).sum()) for b in y] for a in x])
    torch.testing.assert_close(S.symmetric_kl(x, y), expected.double())
    assert torch.allclose(S.symmetric_kl(x, x).diagonal(), torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_aggregation_weights_grids_by_side_and_keeps_distributions():
    fine = torch.rand(16, 16).softmax(1)
    coarse = torch.rand(4, 4).softmax(1)
    out = S.aggregate_self_attention({(4, 4): fine, (2, 2): coarse}, (4, 4))
    assert out.shape == (16, 16)
    torch.testing.assert_close(out.sum(1), torch.ones(16))
    alone = S.aggregate_self_attention({(4, 4): fine}, (4, 4))
    torch.testing.assert_close(alone, fine / fine.sum(1, keepdim=True))
    # the coarse grid's query cell (0, 0) covers fine cells (0,0), (0,1), (1,0), (1,1): they share its part
    mixed = (out - fine * 4 / 6) * 6 / 2
    torch.testing.assert_close(mixed[0], mixed[1])
    torch.testing.assert_close(mixed[0], mixed[4])


def test_clusters_split_into_connected_parts_and_same_words_merge_only_where_they_touch():
    grid = np.array([[0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 0, 0],
                     [2, 1, 1, 1, 1, 2],
                     [1, 1, 1, 1, 1, 1]])
    parts = S.split_components(grid)
    assert len(np.unique(parts)) == 5  # two parts of cluster 0, one of 1, two of 2
    assert parts[0, 0] != parts[0, 5] and parts[2, 0] != parts[2, 5]
    cat = torch.zeros(4, 6)
    cat[:2] = 1.0  # "cat" claims both parts of cluster 0 (apart) ...
    cat[2, 0] = 1.0  # ... and the part of cluster 2 that touches the left one
    candidates = S._candidates(tiny_pipeline("sd").tokenizer, "a cat", None)
    segments, grid_map = S._labelled_segments(parts, {"cat": cat}, candidates, 0.5, merge_labels=True)
    assert [s.label for s in segments] == ["background", "cat", "cat"]
    assert grid_map[0, 0] == grid_map[2, 0] != grid_map[0, 5]  # touching parts merged, the far one not
    assert grid_map[3, 0] == grid_map[2, 5] == 0  # every background part in one segment


def test_anchor_grid_spreads_over_the_grid():
    idx = S.anchor_indices((64, 64), 16)
    assert len(idx) == 256 and idx.min() == 0 and idx.max() == 64 * 64 - 1
    assert len(S.anchor_indices((8, 8), 16)) == 64  # at most one anchor per cell


def test_labels_follow_the_normalised_cross_attention():
    grid = np.zeros((4, 4), dtype=np.int64)
    grid[:, 2:] = 1
    grid[3, 0] = 2
    cat = torch.zeros(4, 4)
    cat[:, 2:] = 1.0
    dog = torch.zeros(4, 4)
    dog[:3, :2] = 0.2  # weak: below the threshold everywhere
    named = S.label_clusters(grid, {"cat": cat, "dog": dog}, threshold=0.3)
    assert named[1][0] == "cat" and named[1][1] == pytest.approx(1.0)
    assert named[0][0] is None  # dog's 0.2 (x 6/7) is under 0.3: background
    assert named[2][0] is None
    assert set(named[0][2]) == {"cat", "dog"}


def test_candidate_words_drop_stop_words_and_the_background_phrase(pipe):
    tok = pipe.tokenizer
    assert S.candidate_words(tok, PROMPT) == ["red", "circle", "blue", "square"]
    assert S.candidate_words(tok, "a red circle and a blue circle") == ["red", "circle", "blue", "circle#2"]
    assert S.candidate_words(tok, PROMPT, ["circle", "WHITE"]) == ["circle", "white"]
    with pytest.raises(AttnkitError, match="'dog'.*not in the prompt"):
        S.candidate_words(tok, PROMPT, ["dog"])
    with pytest.raises(AttnkitError, match="nothing to label"):
        S.candidate_words(tok, PROMPT, [])


def test_joint_bilateral_keeps_probabilities_on_their_side_of_a_colour_edge():
    guide = torch.zeros(3, 16, 16)
    guide[:, :, 8:] = 1.0  # black left half, white right half
    probs = torch.zeros(2, 16, 16)
    ramp = torch.sigmoid((5.5 - torch.arange(16.0)) / 2)  # a blurred boundary 2.5 px left of the edge
    probs[0] = ramp[None, :]
    probs[1] = 1 - probs[0]
    plain = probs.argmax(0)
    refined = S.joint_bilateral(probs, guide, radius=4, sigma_space=4.0, sigma_color=0.1, iterations=6).argmax(0)
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[:, 8:] = 1
    assert (refined == truth).float().mean() > (plain == truth).float().mean()
    assert (refined == truth).all()


def test_upsampled_assignments_are_distributions():
    grid = np.array([[0, 1], [2, 1]])
    probs = S.upsample_assignments(grid, 3, (8, 8))
    assert probs.shape == (3, 8, 8)
    torch.testing.assert_close(probs.sum(0), torch.ones(8, 8))
    assert int(probs[:, 0, 0].argmax()) == 0 and int(probs[:, 7, 7].argmax()) == 1


# -- the lean store ----------------------------------------------------------------------------------------
def test_combined_store_matches_the_per_layer_store(pipe, monkeypatch):
    per_layer = AttentionStore(kinds=("self", "cross"), res=None)
    combined = AttentionStore(kinds=("self", "cross"), res=None, combine_layers=True)
    generate(pipe, PROMPT, per_layer, combined, seed=1, steps=2, progress=False)
    assert len(combined.sums) < len(per_layer.sums)
    assert set(combined.sums) == {f"{info.kind} {h}x{w}" for info, h, w in per_layer.layers.values()}
    for kind in ("self", "cross"):
        torch.testing.assert_close(combined.maps(kind), per_layer.maps(kind))
    # blocked head means (a tiny block budget) give the same maps as the whole block at once
    monkeypatch.setattr("attnkit.store.CHUNK_BYTES", 64)
    blocked = AttentionStore(kinds=("self",), res=None, combine_layers=True)
    generate(pipe, PROMPT, blocked, seed=1, steps=2, progress=False)
    torch.testing.assert_close(blocked.maps("self"), combined.maps("self"))


# -- segment() on a tiny pipeline ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kmeans", "merge"])
def test_segment_a_generated_image(pipe, method):
    before = processors(pipe)
    seg = attnkit.segment(pipe, prompt=PROMPT, method=method, seed=2, steps=2, progress=False)
    assert processors(pipe) == before
    assert seg.label_map.shape == (seg.image.height, seg.image.width) == (32, 32)
    assert seg.grid_map.shape == (16, 16)
    n = len(seg.segments)
    assert [s.index for s in seg.segments] == list(range(n))
    assert set(np.unique(seg.label_map)) <= set(range(n)) and set(np.unique(seg.grid_map)) == set(range(n))
    candidates = ["red", "circle", "blue", "square"]
    assert list(seg.word_maps) == candidates
    for s in seg.segments:
        assert s.label in candidates + ["background"]
        assert set(s.scores) == set(candidates)
        if not s.is_background:
            assert s.score == s.scores[s.label] > seg.settings["threshold"]
    assert len({s.label for s in seg.segments}) == n  # merged by label: one segment per label
    assert seg.self_attention.shape == (256, 256)
    torch.testing.assert_close(seg.probabilities.sum(0), torch.ones(32, 32), atol=1e-4, rtol=0)
    assert sum(s.area for s in seg.segments) == pytest.approx(1.0)
    record = json.loads(json.dumps(seg.record()))
    assert record["settings"]["method"] == method and record["settings"]["source"] == "generated"
    overlay = seg.overlay()
    assert overlay.width > overlay.height  # the legend column
    labels = seg.label_image()
    assert labels.mode == "P" and np.array_equal(np.asarray(labels), seg.label_map)


def test_segment_non_square_images_and_sdxl(pipe):
    seg = attnkit.segment(pipe, prompt=PROMPT, method="merge", height=32, width=48, steps=2, progress=False)
    assert seg.label_map.shape == (32, 48) and seg.grid_map.shape == (16, 24)
    xl = tiny_pipeline("sdxl")
    seg = attnkit.segment(xl, prompt=PROMPT, steps=2, progress=False)
    assert seg.grid_map.shape == (8, 8)  # the tiny SDXL's only self-attention grid
    real = attnkit.segment(xl, prompt=PROMPT, image=seg.image, progress=False)
    assert real.label_map.shape == (32, 32)


def test_segment_counts_and_masks(pipe):
    from scipy import ndimage

    seg = attnkit.segment(pipe, prompt=PROMPT, n_segments=3, merge_labels=False, refine="none", seed=2, steps=2,
                          progress=False)
    assert seg.settings["n_segments"] == 3 and len(seg.segments) >= 3
    for s in seg.segments:  # unmerged, every segment is one connected part of one cluster
        assert ndimage.label(seg.grid_map == s.index, structure=np.ones((3, 3)))[1] == 1
    mask = seg.mask(0)
    assert mask.dtype == bool and mask.shape == seg.label_map.shape
    with pytest.raises(AttnkitError, match="no segment is labelled 'dog'"):
        seg.mask("dog")
    with pytest.raises(AttnkitError, match=f"segment {len(seg.segments)} does not exist"):
        seg.mask(len(seg.segments))


def test_segment_a_real_image_both_ways(pipe, tmp_path):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    path = tmp_path / "in.png"
    image.save(path)
    before = processors(pipe)
    noised = attnkit.segment(pipe, prompt=PROMPT, image=str(path), timestep=300, progress=False)
    assert noised.settings["source"] == "real" and noised.settings["real"] == "noise"
    assert np.array_equal(np.asarray(noised.image), np.asarray(image))  # the fitted input, not a generation
    inverted = attnkit.segment(pipe, prompt=PROMPT, image=image, real="invert", steps=2, progress=False)
    assert inverted.settings["real"] == "invert" and inverted.label_map.shape == (32, 32)
    inv = attnkit.invert(pipe, image, PROMPT, method="ddim", steps=2, progress=False)
    from_inversion = attnkit.segment(pipe, image=inv, progress=False)
    assert from_inversion.prompt == PROMPT
    with pytest.raises(AttnkitError, match="inversion was made for"):
        attnkit.segment(pipe, prompt="a cat", image=inv, progress=False)
    assert processors(pipe) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"n_segments": 1}, "at least 2 segments"),
    ({"n_segments": 257}, "more than the 16x16 attention grid has pixels"),
    ({"n_segments": 65, "res": 8}, "more than the 8x8 attention grid"),
    ({"words": ["dog"]}, "'dog'.*not in the prompt"),
    ({"method": "spectral"}, "unknown method"),
    ({"refine": "crf"}, "unknown refine"),
    ({"threshold": 1.5}, "threshold must be a number from 0 to 1"),
    ({"res": 12}, "res=12"),
    ({"real": "magic"}, "unknown real"),
    ({"image": "missing.png"}, "does not exist"),
    ({"image": 3}, "cannot read an image"),
    ({"image": Image.new("RGB", (32, 32)), "timestep": 5000}, "past the model's 1000 training timesteps"),
])
def test_bad_input_is_one_clear_error_and_leaves_the_pipeline_alone(pipe, kwargs, message):
    before = processors(pipe)
    with pytest.raises(AttnkitError, match=message):
        attnkit.segment(pipe, **{"prompt": PROMPT, "steps": 1, "progress": False, **kwargs})
    assert processors(pipe) == before


def test_unreadable_image_file(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    with pytest.raises(AttnkitError, match="not an image"):
        attnkit.segment(pipe, prompt=PROMPT, image=str(bad), progress=False)


def test_hooks_are_removed_when_the_pass_fails(pipe, monkeypatch):
    before = processors(pipe)

    def fail(self, call):
        raise RuntimeError("boom")

    monkeypatch.setattr(AttentionStore, "observe", fail)
    with pytest.raises(RuntimeError, match="boom"):
        attnkit.segment(pipe, prompt=PROMPT, steps=1, progress=False)
    assert processors(pipe) == before


# -- the command line ------------------------------------------------------------------------------------
def test_cli_segment_generated_and_real(tmp_path):
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(app, ["segment", "--prompt", PROMPT, "--model", "tiny", "--steps", "2", "--out",
                                 str(out), "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert set(record["files"]) == {"image.png", "overlay.png", "labels.png", "record.json"}
    assert record["command"] == "segment" and record["segments"] and record["settings"]["method"] == "kmeans"
    labels = np.asarray(Image.open(out / "labels.png"))
    assert labels.max() < len(record["segments"])
    real = tmp_path / "real"
    result = runner.invoke(app, ["segment", "--prompt", PROMPT, "--image", str(out / "image.png"), "--model",
                                 "tiny", "--method", "merge", "--out", str(real), "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((real / "record.json").read_text())
    assert record["settings"]["source"] == "real" and record["image"].endswith("image.png")


@pytest.mark.parametrize("args, message", [
    (["--image", "nowhere.png"], "does not exist"),
    (["--segments", "1"], "at least 2 segments"),
    (["--method", "spectral"], "unknown method"),
    (["--words", "dog"], "not in the prompt"),
])
def test_cli_segment_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", "--prompt", PROMPT, "--model", "tiny", "--steps", "1", "--out",
                                      str(out), "--threads", "1", "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / "record.json").exists()
