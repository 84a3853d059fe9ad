"""A smoke run of the benchmarks, so they keep working; their targets are checked there."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.mark.pg
def test_benchmarks_run_in_quick_mode(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "serve start: pgjob serve" in done.stdout
    results = json.loads(out.read_text())
    assert results["serve_start"]["pgjob_serve_s"] > 0
