"""Job files: every line validated first; a bad line names its line and field and never stops the others."""

import json

import pytest

from attnkit import AttnkitError
from attnkit.batch.jobs import parse_jobs, read_jobs


def test_valid_lines_become_jobs_and_bad_ones_failures_in_file_order():
    lines = [
        json.dumps({"id": "a", "method": "generate", "prompt": "a red circle", "seed": 1}),
        "",
        "# a comment",
        json.dumps({"id": "b", "method": "generate", "prompt": "a cat", "steps": -1}),
        "{not json",
        json.dumps({"method": "generate", "prompt": "no id"}),
        json.dumps({"id": "../up", "method": "generate", "prompt": "a cat"}),
        json.dumps({"id": "a", "method": "maps", "prompt": "again"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "c", "method": "edit", "source": "a lemon cake", "targets": ["a lego cake"]}),
    ]
    jobs, failures = parse_jobs(lines)
    assert [(j.id, j.line, j.request.method) for j in jobs] == [("a", 1, "generate"), ("c", 10, "edit")]
    assert [(f.id, f.line) for f in failures] == [("b", 4), ("line-5", 5), ("line-6", 6), ("line-7", 7), ("a", 8),
                                                  ("line-9", 9)]
    messages = [f.error for f in failures]
    assert messages[0].startswith("line 4: field 'steps'")
    assert messages[1].startswith("line 5: not valid JSON")
    assert "line 6: field 'id' is required" in messages[2]
    assert "'../up' is not a usable id" in messages[3]
    assert "'a' is already used on line 1" in messages[4]
    assert all(f.record()["status"] == "error" and f.stage == "validate" for f in failures)


def test_a_missing_job_file_is_a_clear_error(tmp_path):
    with pytest.raises(AttnkitError, match="does not exist"):
        read_jobs(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AttnkitError, match="not UTF-8"):
        read_jobs(tmp_path / "bin.jsonl")
