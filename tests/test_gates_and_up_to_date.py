"""Quality gates (exit 11 after the report) and builds that skip work already done, through the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import FAST_TINY_BUILD as FAST

from dfq_deploy.cli.commands import main

PASSING = ["--min-top1", "0", "--max-latency-ms", "60000", "--max-drop-measured", "100"]
FAILING = ["--min-top1", "99", "--max-latency-ms", "0.0001", "--gate-batch", "4", "--max-drop-measured", "100"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def eval_npz(tmp_path):
    """Real-format labelled images (x uint8 N×H×W×C, y labels) whose labels the tiny model cannot know."""
    rng = np.random.default_rng(0)
    path = tmp_path / "eval.npz"
    np.savez(path, x=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 10, 40))
    return path


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_gates_fail_after_the_report_and_finished_builds_are_not_redone(tiny_state_dict, eval_npz, tmp_path):
    out = tmp_path / "build"
    build = ["build", tiny_state_dict, *FAST, "--eval-set", eval_npz, "--out", out]

    start = time.perf_counter()
    first = invoke(*build, *PASSING)
    first_s = time.perf_counter() - start
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    assert [(g["gate"], g["passed"]) for g in report["quality_gates"]] == [
        ("min_top1", True),
        ("max_drop_measured", True),
        ("max_latency_ms", True),
    ]
    assert report["quality_gates"][0]["measured"] == report["accuracy"]["onnxruntime_int8"]
    key = _manifest(out)["build_key"]
    assert len(key) == 64 and _manifest(out)["finished"]

    start = time.perf_counter()
    again = invoke(*build, *PASSING)
    assert again.exit_code == 0, again.output
    assert "up-to-date" in again.output and key[:12] in again.output
    assert time.perf_counter() - start < first_s / 2, "nothing is rebuilt"
    assert _manifest(out)["build_key"] == key

    failing = invoke(*build, *FAILING)  # a changed flag changes the key: rebuilt, and the gates fail
    assert failing.exit_code == 11, failing.output
    assert "up-to-date" not in failing.output and "--min-top1 99" in failing.output
    assert _manifest(out)["build_key"] != key
    report = json.loads((out / "report.json").read_text())
    outcomes = {g["gate"]: g for g in report["quality_gates"]}
    assert not outcomes["min_top1"]["passed"] and not outcomes["max_latency_ms"]["passed"]
    assert outcomes["max_drop_measured"]["passed"]
    assert outcomes["max_latency_ms"]["what"].endswith("at batch 4")
    md = (out / "report.md").read_text()
    assert "## Quality gates" in md and md.count("**FAILED**") == 2

    unchanged = invoke(*build, *FAILING)  # up to date, and its gates' verdict stands
    assert unchanged.exit_code == 11 and "up-to-date" in unchanged.output
    forced = invoke(*build, *FAILING, "--force")
    assert forced.exit_code == 11 and "up-to-date" not in forced.output


@pytest.mark.parametrize(
    "flags, needs",
    [(["--min-top1", "50"], "--eval-set"), (["--max-latency-ms", "5", "--gate-batch", "8"], "--batch-sizes")],
)
def test_a_gate_the_build_cannot_measure_is_refused_before_any_work(flags, needs, tiny_state_dict, tmp_path):
    result = invoke("build", tiny_state_dict, *FAST, *flags, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert needs in result.output and not (tmp_path / "o").exists()


def test_a_change_to_dfq_deploys_source_makes_a_finished_build_stale(tmp_path, monkeypatch):
    from dfq_deploy.io import build_key as keys

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "stage.py").write_text("DEFAULT = 'zeroq'\n")
    (tree / "notes.txt").write_text("not source")
    before = keys.python_tree_digest({"pkg": tree})
    (tree / "notes.txt").write_text("still not source")
    assert keys.python_tree_digest({"pkg": tree}) == before
    (tree / "sub" / "stage.py").write_text("DEFAULT = 'noise'\n")  # what 'auto' means moved
    changed = keys.python_tree_digest({"pkg": tree})
    assert changed != before
    (tree / "sub" / "stage.py").rename(tree / "stage.py")
    assert keys.python_tree_digest({"pkg": tree}) not in (before, changed)

    # The same model and config under other source: another key, so the old build is rebuilt.
    first = keys.build_key(model, config={"method": "auto"})
    monkeypatch.setattr(keys, "source_digest", lambda: changed)
    assert keys.build_key(model, config={"method": "auto"}) != first
