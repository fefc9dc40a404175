"""benchmarks/mmdit_concepts.py: its mIoU and ground truth against hand-made cases, and one scene end to end on
a tiny SD3 pipeline (random weights: the plumbing, not the numbers)."""

import importlib.util
from pathlib import Path

import numpy as np

from attnkit.bundled.scenes import render_scene
from attnkit.testing import tiny_pipeline

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mmdit_concepts.py"
spec = importlib.util.spec_from_file_location("mmdit_concepts", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_miou_by_hand():
    truth = np.array([[0, 0], [1, 1]])
    assert bench.miou(truth, truth, 3) == 1.0  # class 2 is absent from the truth: not averaged
    pred = np.array([[0, 1], [1, 1]])
    assert bench.miou(pred, truth, 2) == (0.5 + 2 / 3) / 2


def test_scene_truth_and_concepts():
    scene = render_scene(10_400_000)
    concepts = bench.scene_concepts(scene)
    assert concepts[-1] == "background" and len(set(concepts)) == len(concepts)
    truth = bench.scene_truth(scene, concepts)
    for obj in scene.objects:
        assert (truth[obj.mask] == concepts.index(obj.shape)).all()
    outside = ~np.any([o.mask for o in scene.objects], axis=0)
    assert (truth[outside] == concepts.index("background")).all()


def test_run_concepts_on_a_tiny_pipeline():
    result = bench.run_concepts(tiny_pipeline("sd3"), 1)
    assert 0.0 <= result["concept_miou"] <= 1.0 and 0.0 <= result["xattn_miou"] <= 1.0
    assert result["scenes"] == 1 and result["blocks"] == [2]
