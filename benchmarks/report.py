"""Turns pytest-benchmark JSON into ratio tables: for every group (one configuration), each
implementation's median time and its ratio to pyssl's (> 1: pyssl is faster), plus the memory
saved for backward and the peak memory where measured.

    python -m benchmarks.report results.json [more.json ...] [--merged all.json] [--plot r.png]

``--plot`` draws the same ratios as a chart: one bar per configuration and baseline, on a log
axis with parity (1x) marked, so a glance shows where pyssl wins and by how much.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
from collections import defaultdict

from .common import PYSSL


def _mb(x):
    return "" if x is None else f"{x / 2**20:.2f}"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge(datas: list[dict]) -> dict:
    """One result from several runs (e.g. one per benchmark family): the first run's machine
    and date, every run's benchmarks."""
    if not datas:
        raise ValueError("no benchmark results to merge")
    out = dict(datas[0])
    out["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    return out


def rows(data: dict) -> list[dict]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        groups[b["group"]][info.get("impl", b["name"])] = {
            "median": b["stats"]["median"],
            "saved": info.get("saved_bytes"),
            "peak": info.get("peak_bytes"),
        }
    out = []
    for group in sorted(groups):
        impls = groups[group]
        base = impls.get(PYSSL, {}).get("median")
        for impl in sorted(impls, key=lambda k: (k != PYSSL, k)):
            r = impls[impl]
            ratio = None if (base is None or impl == PYSSL) else r["median"] / base
            out.append({"group": group, "impl": impl, "median_ms": r["median"] * 1e3,
                        "ratio": ratio, "saved": r["saved"], "peak": r["peak"]})
    return out


def format_table(data: dict) -> str:
    mi = data.get("machine_info", {})
    import os

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    header = (f"machine: {mi.get('node', platform.node())}, {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
              f"python {mi.get('python_version', '')}; CPU threads: {threads}; date {data.get('datetime', '')[:10]}")
    px = mi.get("pyssl")
    if px:  # recorded by benchmarks/conftest.py
        cpu = px.get("cpu", {})
        header += (f"\nCPU: {cpu.get('name', '?')} (family {cpu.get('family', '?')}, model "
                   f"{cpu.get('model', '?')}; {', '.join(cpu.get('vector') or []) or 'no AVX2'}); "
                   f"torch {px.get('torch')} (CPU kernels {px.get('torch_cpu_capability')}); "
                   f"pyssl {px.get('version')} (CPU kernels {px.get('cpu_kernels')})"
                   + (f"; GPU: {px['gpu']}" if px.get("gpu") else ""))
    lines = [header, "",
             "| configuration | impl | median ms | time / pyssl time | saved for backward MB | peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    last = None
    for r in rows(data):
        group = r["group"] if r["group"] != last else ""
        last = r["group"]
        ratio = "1.00 (pyssl)" if r["impl"] == PYSSL else ("" if r["ratio"] is None else f"{r['ratio']:.2f}")
        lines.append(f"| {group} | {r['impl']} | {r['median_ms']:.3f} | {ratio} | {_mb(r['saved'])} | {_mb(r['peak'])} |")
    return "\n".join(lines)


def bar_color(row: dict) -> str:
    """Green where pyssl is faster than the baseline, red where slower; grey for another pyssl
    path (e.g. ``pyssl_deterministic``, ``pyssl_fused``), which is a comparison, not a baseline."""
    if row["impl"].startswith(PYSSL):
        return "tab:gray"
    return "tab:green" if row["ratio"] >= 1 else "tab:red"


def plot(data: dict, path: str) -> str:
    """A horizontal bar chart of ``time(baseline) / time(pyssl)`` for every configuration and
    baseline of ``data`` (log axis, parity at 1x; bars right of it: pyssl is faster; grey bars
    compare pyssl with another of its own paths), written as a PNG at ``path``. Configurations
    without a pyssl timing have no ratio and are left out. Returns ``path``."""
    from pyssl.engine.logger import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows(data) if r["ratio"] is not None]
    if not bars:
        raise ValueError("no configuration has both a pyssl and a baseline timing: nothing to plot")
    labels = [f"{r['group']}  vs {r['impl']}" for r in bars]
    ratios = [r["ratio"] for r in bars]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.24 * len(bars)))
    y = list(range(len(bars)))[::-1]  # first row at the top, as in the table
    ax.barh(y, ratios, color=[bar_color(r) for r in bars], height=0.7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    for yi, v in zip(y, ratios):
        ax.text(v, yi, f" {v:.2f}x", va="center", ha="left", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.6, len(bars) - 0.4)
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 1.5, hi * 3)  # room for the labels right of the longest bar
    ax.set_xlabel("time(baseline) / time(pyssl)   (> 1: pyssl is faster)")
    header = format_table(data).split("\n\n")[0]  # machine, CPU/GPU, builds
    title = [part for line in header.splitlines() for part in textwrap.wrap(line, 140)]
    fig.suptitle("\n".join(title), fontsize=7)
    # keep the title's lines (about 0.13 in each at 7 pt) clear of the top bars
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.15 + 0.13 * len(title)) / fig.get_figheight()))
    save_figure(fig, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (merged into one table)")
    p.add_argument("--merged", help="also write the merged JSON here")
    p.add_argument("--plot", help="also draw the ratios as a bar chart (PNG) here")
    args = p.parse_args(argv)
    data = merge([load(f) for f in args.json])
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(data, f)
    print(format_table(data))
    if args.plot:
        print(f"ratio chart: {plot(data, args.plot)}", file=sys.stderr)  # stdout: the table alone


if __name__ == "__main__":
    main()
