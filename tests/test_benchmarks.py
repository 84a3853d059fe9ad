"""A smoke run of the benchmark suite, so that it keeps working; the targets are checked by
the full run (`./dev bench`), whose numbers go to docs/performance.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.mark.pg
def test_benchmarks_run_in_quick_mode_and_write_the_report(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "performance.json").read_text())
    assert results["cold_start"]["cold_pgjob"]["total_s"] > 0
    backends = {r["backend"] for r in results["throughput"]["rows"]}
    assert {"pgjob", "pgjob_journal", "plain_same", "plain_default", "sqlite", "journal",
            "inmemory"} <= backends
    assert all(r["journal_ms"] > 0 for r in results["journal_size"]["rows"])
    for row in results["journal_join"]["rows"]:  # a joining worker uses the snapshot there is
        assert row["fresh"]["snapshot_loaded"] and row["oldest"]["snapshot_loaded"]
        assert not row["none"]["snapshot_loaded"] and row["none"]["ready_s"] > 0
    assert all(r["peak_max"] >= 1 for r in results["connections"]["rows"])
    for mode in results["scale"]["modes"].values():
        assert mode["connected"] == mode["workers"] and mode["trials"] > 0
    page = (tmp_path / "performance.md").read_text()
    for heading in ("## 1. Cold start", "## 2. Trial throughput", "## 3. Connections",
                    "## 4. A thousand workers", "## 5. Server settings",
                    "## 6. A journal home's study as it grows",
                    "## 7. A new worker joining a large journal study"):
        assert heading in page
    for image in ("performance-throughput.png", "performance-scale.png",
                  "performance-journal.png"):
        assert (tmp_path / image).read_bytes().startswith(b"\x89PNG")
