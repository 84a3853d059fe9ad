"""Run every pgjob benchmark: `python benchmarks/run.py [--quick] [--out FILE]`.

--quick is a smoke run (a few repeats) that CI uses to keep the benchmarks working; the
numbers it prints are not meant to be compared. Results go to stdout and, as JSON, to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resilience  # noqa: E402
import serve_start  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run pgjob's benchmarks.")
    parser.add_argument("--quick", action="store_true", help="smoke run with few repeats")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 10
    results = {"machine": {"python": platform.python_version(), "platform": platform.platform()},
               "quick": args.quick,
               "serve_start": serve_start.measure(repeats)}
    r = results["serve_start"]
    print(f"serve start: pgjob serve {r['pgjob_serve_s'] * 1000:.0f} ms, pg_ctl start -w "
          f"{r['pg_ctl_start_s'] * 1000:.0f} ms, ratio {r['ratio']} (target <= "
          f"{r['target_ratio']}, {'met' if r['met'] else 'NOT met'}; median of {r['repeats']})")
    results["resilience"] = resilience.measure(args.quick)
    rec, thr = results["resilience"]["recovery"], results["resilience"]["throughput"]
    print(f"recovery: new server published {rec['restart_s']} s after the old one was killed; "
          f"workers progressing after {rec['recovery_s']} s ({rec['target']}: "
          f"{'met' if rec['met'] else 'NOT met'})")
    print(f"throughput ({thr['workers']} workers): pgjob storage {thr['pgjob_trials_per_s']} "
          f"trials/s, plain RDBStorage {thr['plain_trials_per_s']} trials/s, ratio "
          f"{thr['ratio']} (target >= {thr['target_ratio']}, {'met' if thr['met'] else 'NOT met'})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
