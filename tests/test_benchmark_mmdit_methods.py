"""benchmarks/mmdit_methods.py: its layout score on hand-made cases, and one scene end to end on a tiny SD3
pipeline (random weights: the plumbing, not the numbers)."""

import importlib.util
import json
from pathlib import Path

from attnkit.bundled.scenes import recolour_first, render_scene, render_spec

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mmdit_methods.py"
spec = importlib.util.spec_from_file_location("mmdit_methods", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_layout_score_of_a_perfect_and_a_missing_edit():
    scene = render_scene(10_600_000)
    edited_spec, _ = recolour_first(scene.spec)
    old, new = scene.objects[0].color, edited_spec.objects[0].color
    iou, changed = bench.layout(scene, render_spec(edited_spec).image, old, new)
    assert iou > 0.95 and changed  # the exact edit: same mask, new colour, old colour gone
    assert bench.layout(scene, scene.image, old, new) == (0.0, False)  # nothing of the new colour: no credit


def test_main_on_a_tiny_pipeline_ends_with_the_json_line(capsys):
    summary = bench.main(["--model", "tiny-sd3", "--scenes", "1", "--edit-scenes", "1", "--concept-scenes", "1",
                          "--budget", "2", "--edit-steps", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    for key in ("concept_miou", "xattn_miou", "psnr_euler", "psnr_second_order", "edit_layout_iou",
                "flowedit_layout_iou", "psnr_vae_roundtrip"):
        assert key in summary and summary[key] is not None
    assert summary["budget"] == 2 and summary["scenes"] == 1
