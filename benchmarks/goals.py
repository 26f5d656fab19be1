"""The open issues' benchmark goals, read off a benchmark result: for each goal, the worst ratio
over the configurations it covers, where that is, and whether the goal holds.

    python -m benchmarks.goals bench.json [more.json ...]

`benchmarks/gpu_check.sh` appends this to its summary, so a GPU run states the goals directly.
Goals (issue texts; ratios are time(baseline) / time(pyssl), > 1: pyssl faster):
  * issue 3, DINO loss, forward+backward: CPU at least 2x DINO's pair loop and 1.5x the stacked
    einsum; GPU at least 5x the pair loop. (Its bandwidth-floor goal is in gpu_profile's output,
    profile.txt: kernels and wall time as multiples of the floor.)
  * issue 5, flow warp on NCHW maps (the issue's grid), forward and forward+backward: at least 2x
    grid_sample + the check, on CPU and GPU; on CUDA the deterministic mode within 1.5x of the
    fast mode (time(deterministic) / time(fast) <= 1.5). The fused dense loss is kept only if it
    beats sampling then the loss (ratio > 1).
Only goals for the devices the result ran on are listed; one no configuration covers is
"not measured".
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from .report import load, merge, rows


@dataclass(frozen=True)
class Goal:
    issue: int
    what: str
    group: str  # regular expression over group names; {device} is filled in
    impl: str  # the baseline (or, with at_most, the other pyssl path) compared with pyssl
    minimum: float  # the ratio must be at least this (with at_most: at most this)
    device: str  # "cpu" or "cuda"
    at_most: bool = False  # the ratio time(impl) / time(pyssl) must be at most `minimum`


def _goal(issue, what, group, impl, targets, at_most=False):
    """One Goal per (device, target) of `targets`."""
    return [Goal(issue, what, group, impl, t, d, at_most) for d, t in targets.items()]


_DINO_STEP = r"dino_loss fwd\+bwd .*\[{device}\]"
_WARP = r"flow warp {mode} B=.*\[{{device}}\]"  # NCHW only: not "channels-last"
GOALS = [
    *_goal(3, "DINO loss fwd+bwd vs DINO's pair loop", _DINO_STEP, "dino_pair_loop",
           {"cpu": 2.0, "cuda": 5.0}),
    *_goal(3, "DINO loss fwd+bwd vs the stacked einsum", _DINO_STEP, "stacked_einsum", {"cpu": 1.5}),
    *_goal(5, "flow warp fwd vs grid_sample + check", _WARP.format(mode="fwd"), "grid_sample",
           {"cpu": 2.0, "cuda": 2.0}),
    *_goal(5, "flow warp fwd+bwd vs grid_sample + check", _WARP.format(mode=r"fwd\+bwd"),
           "grid_sample", {"cpu": 2.0, "cuda": 2.0}),
    *_goal(5, "deterministic / fast mode, flow warp fwd+bwd", _WARP.format(mode=r"fwd\+bwd"),
           "pyssl_deterministic", {"cuda": 1.5}, at_most=True),
    *_goal(5, "fused dense loss vs sampling then the loss", r"dense correspondence loss .*\[{device}\]",
           "pyssl_sample_then_loss", {"cpu": 1.0, "cuda": 1.0}),
]


def evaluate(data: dict, goals=GOALS) -> list[dict]:
    """One entry per goal: its worst ratio, the configuration with it, the number of
    configurations measured, and whether the goal holds there (None: not measured)."""
    table = rows(data)
    out = []
    for g in goals:
        pattern = re.compile(g.group.format(device=re.escape(g.device)))
        found = [r for r in table if r["impl"] == g.impl and r["ratio"] is not None
                 and pattern.fullmatch(r["group"])]
        entry = {"goal": g, "count": len(found), "worst": None, "where": None, "met": None}
        if found:  # the table's ratio is time(impl) / time(pyssl)
            values = [(r["ratio"], r["group"]) for r in found]
            worst, where = max(values) if g.at_most else min(values)
            entry.update(worst=worst, where=where,
                         met=worst <= g.minimum if g.at_most else worst >= g.minimum)
        out.append(entry)
    return out


def devices(data: dict) -> set[str]:
    """The devices the result's configurations ran on (the "[device]" ending their names)."""
    return {m.group(1) for b in data.get("benchmarks", [])
            if (m := re.search(r"\[(\w+)(?::\d+)?\]$", b.get("group") or ""))}


def format_goals(data: dict, goals=GOALS, measured_only: bool = False) -> str:
    """The goals of the devices the result has (all of them if it names none) as a markdown
    table; with measured_only, only those some configuration covers ("" if none)."""
    present = devices(data)
    entries = evaluate(data, [g for g in goals if not present or g.device in present])
    if measured_only:
        entries = [e for e in entries if e["met"] is not None]
        if not entries:
            return ""
    lines = ["| issue | goal | device | target | worst measured | where | verdict |",
             "|---|---|---|---:|---:|---|---|"]
    for e in entries:
        g = e["goal"]
        target = f"{'<=' if g.at_most else '>='} {g.minimum:g}x"
        if e["met"] is None:
            lines.append(f"| {g.issue} | {g.what} | {g.device} | {target} | | | not measured |")
            continue
        verdict = "met" if e["met"] else "**NOT MET**"
        lines.append(f"| {g.issue} | {g.what} | {g.device} | {target} | {e['worst']:.2f}x | "
                     f"{e['where']} (of {e['count']}) | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (merged)")
    args = p.parse_args(argv)
    print(format_goals(merge([load(f) for f in args.json])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
