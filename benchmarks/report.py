"""Turns pytest-benchmark JSON into ratio tables: for every group (one configuration), each
implementation's median time and its ratio to pyssl's (> 1: pyssl is faster), plus the memory
saved for backward and the peak memory where measured.

    python -m benchmarks.report results.json [more.json ...] [--merged all.json]
"""

from __future__ import annotations

import argparse
import json
import platform
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (merged into one table)")
    p.add_argument("--merged", help="also write the merged JSON here")
    args = p.parse_args(argv)
    data = merge([load(f) for f in args.json])
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(data, f)
    print(format_table(data))


if __name__ == "__main__":
    main()
