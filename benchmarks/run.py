"""Runs benchmark files with pytest-benchmark and prints the ratio table.

    python -m benchmarks.run                 # every benchmarks/bench_*.py
    python -m benchmarks.run masking --quick # benchmarks/bench_masking.py, small configs
    python -m benchmarks.run masking --json out.json --device cpu
    python -m benchmarks.run flow --threads 1 --plot flow.png   # also a chart of the ratios
    python -m benchmarks.run flow -k "dense_loss"   # only the benchmarks pytest -k selects
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from . import goals, report

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run pyssl benchmarks and print ratio tables")
    p.add_argument("families", nargs="*", help="e.g. masking dino_loss (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller configurations")
    p.add_argument("--full", action="store_true",
                   help="also the configurations a CPU run skips for time (minutes each)")
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    p.add_argument("--json", help="also keep pytest-benchmark's JSON here")
    p.add_argument("--plot", help="also draw the ratios as a bar chart (PNG) here")
    p.add_argument("--max-time", default="0.5", help="seconds per benchmark (pytest-benchmark)")
    p.add_argument("-k", dest="select", metavar="EXPR",
                   help="only the benchmarks this pytest -k expression selects")
    p.add_argument("--threads", type=int, help="CPU threads for torch and pyssl (OMP_NUM_THREADS); "
                   "1 gives stable figures on a shared machine")
    args = p.parse_args(argv)
    files = ([str(HERE / f"bench_{f}.py") for f in args.families] if args.families
             else sorted(str(f) for f in HERE.glob("bench_*.py")))
    for f in files:
        if not pathlib.Path(f).exists():
            p.error(f"no benchmark file {f}")
    out = args.json or tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={out}", f"--benchmark-max-time={args.max_time}",
           "--benchmark-min-rounds=3", "--benchmark-disable-gc", f"--bench-device={args.device}",
           "--benchmark-columns=median,iqr,rounds"]
    if args.quick:
        cmd.append("--bench-quick")
    if args.full:
        cmd.append("--bench-full")
    if args.select:
        cmd += ["-k", args.select]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the benchmark process and the report
    rc = subprocess.call(cmd, cwd=HERE.parent)
    print()
    if not pathlib.Path(out).exists():
        print("no benchmark ran (no device of the requested kind?)" if rc in (0, 5)
              else f"the benchmarks failed (pytest exit status {rc}) before writing results")
        return rc or 1
    # A failing benchmark still leaves the others' figures: print them, then report the failure.
    data = report.load(out)
    print(report.format_table(data))
    goal_table = goals.format_goals(data, measured_only=True)
    if goal_table:
        print("\nThe open issues' goals these figures cover (benchmarks/goals.py):\n")
        print(goal_table)
    if args.plot:
        try:
            print(f"ratio chart: {report.plot(data, args.plot)}")
        except ValueError as e:  # e.g. only baselines ran
            print(f"no ratio chart: {e}")
    return 0 if rc in (0, 5) else rc


if __name__ == "__main__":
    raise SystemExit(main())
