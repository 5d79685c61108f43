"""The hand-written training loop in examples/ runs end to end on the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_patch.py"


@pytest.mark.slow
def test_train_patch_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("it ") for line in lines) == 8  # every 10th of 80 iterations
    assert "cross_attention=" in lines[0] and "self_attention=" in lines[0]
    assert lines[-1].startswith("clean accuracy") and "random-noise control" in lines[-1]
    assert (tmp_path / "patch.safetensors").is_file()
