"""The README's demo command, end to end: it must really learn (slow: run by CI with `pytest -m slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_trains_a_model_that_segments_held_out_images(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLIPSEG_DEMO_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo_output"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_train.py"), "--demo", "--output_dir", str(out)],
        env=env, capture_output=True, text=True, timeout=3600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_images"] == 200  # the held-out synthetic test images
    assert results["eval_fgiou_0.3"] >= 0.5, results
    assert "Sample predictions:" in result.stdout and len(list((out / "samples").glob("*.png"))) == 6
    assert (out / "README.md").read_text().count("Demo model") == 1
