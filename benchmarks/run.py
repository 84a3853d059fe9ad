"""Run every pgjob benchmark and write the report: `python benchmarks/run.py [--quick] [--out DIR]`.

A full run writes docs/performance.md, docs/performance.json and the plots (about 25-30
minutes here). --quick is a smoke run (tiny sizes) that CI uses to keep the benchmarks
working; it writes into a scratch directory unless --out is given, and its numbers mean
nothing.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cold_start  # noqa: E402
import common  # noqa: E402
import connections  # noqa: E402
import journal_join  # noqa: E402
import journal_size  # noqa: E402
import report  # noqa: E402
import resilience  # noqa: E402
import scale  # noqa: E402
import server_settings  # noqa: E402
import throughput  # noqa: E402
from pgjob import binaries, pooler  # noqa: E402


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True,
                              timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    os_name = next((line.split("=", 1)[1].strip('"') for line in
                    Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.system())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {name: importlib.metadata.version(name)
                for name in ("pgjob", "optuna", "SQLAlchemy", "psycopg")}
    found = pooler.find()
    return {"date": datetime.date.today().isoformat(), "CPU": f"{os.cpu_count()} x {cpu}",
            "memory": f"{mem_gib:.0f} GiB", "OS": f"{os_name}, Linux {platform.release()}",
            "Python": platform.python_version(),
            "PostgreSQL": _first_line([str(binaries.find() / "postgres"), "--version"]),
            "pgbouncer": _first_line([str(found), "--version"]) if found else "not installed",
            **versions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run pgjob's benchmarks, write the report.")
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    parser.add_argument("--out", type=Path, help="directory for performance.md/.json and "
                        "the plots (default: docs/, or a scratch directory with --quick)")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="pgjob-bench-report-")) if args.quick
                       else HERE.parent / "docs")
    results = {"quick": args.quick, "machine": machine()}
    began_all = time.perf_counter()
    try:
        for name, module in (("cold_start", cold_start), ("throughput", throughput),
                             ("journal_size", journal_size), ("journal_join", journal_join),
                             ("connections", connections),
                             ("server_settings", server_settings), ("recovery", resilience)):
            print(f"bench: {name} ...", flush=True)
            began = time.perf_counter()
            results[name] = module.measure(args.quick)
            print(f"bench: {name} took {time.perf_counter() - began:.0f} s", flush=True)
        print("bench: scale ...", flush=True)
        began = time.perf_counter()
        results["scale"] = scale.measure(args.quick, pooler=pooler.find() is not None)
        print(f"bench: scale took {time.perf_counter() - began:.0f} s", flush=True)
        page = report.write(results, out)
    finally:
        shutil.rmtree(common.ROOT, ignore_errors=True)
    print(report.targets_table(results))
    print(f"bench: report written to {page} ({time.perf_counter() - began_all:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
