"""The benchmark report: ratio tables from pytest-benchmark JSON, merged across runs (gpu_check.sh
runs one family at a time and merges their results)."""

import json

import pytest

from benchmarks import report


def _result(group, times, node="gpu-box"):
    return {
        "machine_info": {"node": node, "cpu": {"brand_raw": "test cpu"}, "python_version": "3.x"},
        "datetime": "2026-11-27T00:00:00",
        "benchmarks": [
            {"group": group, "name": f"test[{impl}]", "stats": {"median": t},
             "extra_info": {"impl": impl}}
            for impl, t in times.items()
        ],
    }


def test_merged_table_has_every_run_and_the_ratios(tmp_path, capsys):
    a = _result("masking fwd", {"pyssl": 0.001, "mae_torch": 0.003})
    b = _result("flow fwd", {"pyssl": 0.002, "grid_sample": 0.005}, node="other")
    paths = []
    for name, data in (("a.json", a), ("b.json", b)):
        paths.append(str(tmp_path / name))
        with open(paths[-1], "w") as f:
            json.dump(data, f)
    merged_path = tmp_path / "all.json"
    report.main([*paths, "--merged", str(merged_path)])
    out = capsys.readouterr().out
    assert out.startswith("machine: gpu-box")  # the first run's machine
    assert "| masking fwd | pyssl | 1.000 | 1.00 (pyssl) |" in out
    assert "|  | mae_torch | 3.000 | 3.00 |" in out
    assert "| flow fwd | pyssl | 2.000 | 1.00 (pyssl) |" in out
    assert "|  | grid_sample | 5.000 | 2.50 |" in out
    merged = json.loads(merged_path.read_text())
    assert len(merged["benchmarks"]) == 4
    assert report.rows(merged) == report.rows(report.merge([a, b]))


def test_header_names_the_cpu_the_kernels_and_the_gpu():
    data = _result("masking fwd", {"pyssl": 0.001, "mae_torch": 0.003})
    data["machine_info"]["pyssl"] = {
        "version": "0.1", "cpu_kernels": "avx512", "torch": "2.14.1",
        "torch_cpu_capability": "AVX512", "gpu": "NVIDIA H100 80GB HBM3",
        "cpu": {"name": "AMD EPYC", "family": "26", "model": "2", "vector": ["avx2", "avx512f"]}}
    head = report.format_table(data).splitlines()[1]
    assert head == ("CPU: AMD EPYC (family 26, model 2; avx2, avx512f); torch 2.14.1 (CPU kernels "
                    "AVX512); pyssl 0.1 (CPU kernels avx512); GPU: NVIDIA H100 80GB HBM3")


def test_benchmark_runs_record_the_cpu_and_kernel_builds():
    from benchmarks import conftest

    class Config:
        pass

    info = {}
    conftest.pytest_benchmark_update_machine_info(Config(), info)
    px = info["pyssl"]
    assert px["cpu_kernels"] in ("baseline", "avx2", "avx512") and px["torch"]
    assert px["cpu"]["name"]


def test_merge_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no benchmark results"):
        report.merge([])


def test_ratio_chart_is_a_png_with_a_bar_per_baseline(tmp_path, monkeypatch):
    data = report.merge([_result("masking fwd", {"pyssl": 0.001, "mae_torch": 0.003, "beit": 0.0005}),
                         _result("flow fwd", {"grid_sample": 0.005})])  # no pyssl: no ratio
    drawn = {}
    import matplotlib.axes

    real = matplotlib.axes.Axes.barh

    def barh(self, y, width, *a, **k):
        drawn["ratios"] = list(width)
        return real(self, y, width, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "barh", barh)
    out = tmp_path / "ratios.png"
    report.main([_write(tmp_path, data), "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn["ratios"]) == pytest.approx([0.5, 3.0])  # beit slower than pyssl: 0.5


def test_bar_colors_say_faster_slower_or_another_pyssl_path():
    assert report.bar_color({"impl": "mae", "ratio": 2.0}) == "tab:green"
    assert report.bar_color({"impl": "mae", "ratio": 0.5}) == "tab:red"
    assert report.bar_color({"impl": "pyssl_deterministic", "ratio": 0.5}) == "tab:gray"


def test_ratio_chart_without_any_ratio_is_a_clear_error(tmp_path):
    data = _result("flow fwd", {"grid_sample": 0.005})
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot(data, str(tmp_path / "r.png"))


def _write(tmp_path, data):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return str(path)


_COLLECT = """
import json, sys
import pytest

class Ids:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

result = []
for family, select in json.loads(sys.argv[1]):
    ids = Ids()
    args = [f"benchmarks/bench_{family}.py", "--collect-only", "-q", "-p", "no:cacheprovider",
            "--bench-device=cuda"] + (["-k", select] if select else [])
    pytest.main(args, plugins=[ids])
    result.append(ids.ids)
print("IDS" + json.dumps(result))
"""


def _collected(queries):
    """For each (family, -k selection or ""), the benchmark ids of benchmarks/bench_<family>.py
    that a GPU run would collect (one pytest process for all of them)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(queries)], cwd=root,
                         capture_output=True, text=True).stdout
    return json.loads(out[out.rindex("IDS") + 3:])


def test_gpu_check_benchmark_parts_select_each_benchmark_once_with_its_count_as_weight():
    """gpu_check.sh runs the GPU benchmarks in parts (a family, or a pytest -k selection of one),
    each given time in proportion to its weight, the number of benchmarks it runs: the parts of a
    family select each of its benchmarks exactly once, and every weight is that count."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh").read_text()
    block = text[text.index("parts=(\n"):text.index("\n)\n", text.index("parts=(\n"))]
    parts = [line.split("|") for line in re.findall(r'^\s+"([^"]+)"$', block, re.M)]
    assert parts and all(len(p) == 3 for p in parts)
    families = sorted({family for family, _, _ in parts})
    found = _collected([[f, s] for f, s, _ in parts] + [[f, ""] for f in families])
    seen = {}
    for (family, select, weight), ids in zip(parts, found):
        assert len(ids) == int(weight), (family, select, len(ids))
        assert not set(ids) & seen.setdefault(family, set()), (family, select)
        seen[family] |= set(ids)
    for family, ids in zip(families, found[len(parts):]):
        assert ids and seen[family] == set(ids), family


def test_gpu_profile_cases_run_and_tabulate_on_the_cpu():
    """benchmarks/gpu_profile.py runs in gpu_check.sh on a GPU only; its cases and table are
    checked here on small CPU inputs, so a GPU run is not spent on a broken script."""
    from benchmarks import bench_flow, gpu_profile

    old = bench_flow.H, bench_flow.W
    bench_flow.H, bench_flow.W = 16, 24
    try:
        for title, make, params, impls in gpu_profile.CASES:
            small = {gpu_profile._dino_case: (2, 300), gpu_profile._ibot_case: (70, 300)}.get(make, (2, 8))
            for impl in impls:
                if impl == "pyssl_deterministic":
                    continue  # CUDA only
                stats = {}
                lines = gpu_profile.profile_case(make(*small, impl, device="cpu"), 1, 4, device="cpu",
                                                 stats=stats)
                assert lines[0].startswith("  wall ") and len(lines) >= 2, (title, impl, lines)
                assert all(" ms " in line for line in lines[1:]), lines
                assert stats["wall"] > 0 and stats["total"] > 0
        # issue 3's floor at B=32, K=65536, fp32: 117 MB read forward, 218 MB moved backward
        assert gpu_profile.dino_floor_bytes(32, 65536) == (14 + 14 + 12) * 32 * 65536 * 4
        assert gpu_profile.copy_bandwidth("cpu", mb=8) > 0
        line = gpu_profile.floor_line(335_544_320, 3.0e12, {"wall": 0.2236, "total": 0.1677})
        assert "336 MB at 3.00 TB/s = 0.112 ms" in line and "kernels 1.50x" in line and "wall 2.00x" in line
    finally:
        bench_flow.H, bench_flow.W = old


def test_cuda_smoke_families_run_on_the_cpu(monkeypatch):
    """benchmarks/cuda_smoke.py is what compute-sanitizer runs in gpu_check.sh; every family
    runs here on CPU tensors (small sizes), so a GPU run is not spent on a broken call."""
    import torch

    from benchmarks import cuda_smoke

    monkeypatch.setenv("PYSSL_SMOKE_SMALL", "1")
    try:
        for fam in cuda_smoke.FAMILIES:
            fam(torch.device("cpu"))
    finally:
        torch.use_deterministic_algorithms(False)


def _results(groups):
    """pytest-benchmark JSON with one group per entry: {group: {impl: seconds}}."""
    return {"machine_info": {}, "datetime": "2026-11-28T00:00:00",
            "benchmarks": [{"group": g, "name": f"t[{i}]", "stats": {"median": t},
                            "extra_info": {"impl": i}}
                           for g, times in groups.items() for i, t in times.items()]}


def test_goals_take_the_worst_configuration_and_the_right_direction():
    from benchmarks import goals

    data = _results({
        "dino_loss fwd+bwd B=32 crops=2+10 K=8192 fp32 [cuda]": {"pyssl": 1.0, "dino_pair_loop": 6.0},
        "dino_loss fwd+bwd B=32 crops=2+10 K=65536 fp32 [cuda]": {"pyssl": 2.0, "dino_pair_loop": 9.0},
        "dino_loss fwd B=32 crops=2+10 K=65536 fp32 [cuda]": {"pyssl": 1.0, "dino_pair_loop": 1.5},
        "flow warp fwd+bwd B=2 C=3 256x512 fp32 [cuda]":
            {"pyssl": 1.0, "grid_sample": 2.5, "pyssl_deterministic": 1.4},
        "flow warp fwd+bwd B=8 C=64 256x512 fp32 [cuda]":
            {"pyssl": 2.0, "grid_sample": 5.0, "pyssl_deterministic": 3.2},
        # channels-last maps are beyond the grid: not part of the warp goal
        "flow warp fwd+bwd channels-last B=2 C=3 256x512 fp32 [cuda]": {"pyssl": 1.0, "grid_sample": 1.1},
    })
    by = {(e["goal"].what, e["goal"].device): e for e in goals.evaluate(data)}
    dino = by[("DINO loss fwd+bwd vs DINO's pair loop", "cuda")]
    assert dino["count"] == 2 and dino["worst"] == pytest.approx(4.5) and dino["met"] is False
    assert dino["where"] == "dino_loss fwd+bwd B=32 crops=2+10 K=65536 fp32 [cuda]"
    warp = by[("flow warp fwd+bwd vs grid_sample + check", "cuda")]
    assert warp["count"] == 2 and warp["worst"] == pytest.approx(2.5) and warp["met"] is True
    det = by[("deterministic / fast mode, flow warp fwd+bwd", "cuda")]  # an upper bound: the max
    assert det["worst"] == pytest.approx(1.6) and det["met"] is False
    assert det["where"] == "flow warp fwd+bwd B=8 C=64 256x512 fp32 [cuda]"
    assert by[("flow warp fwd vs grid_sample + check", "cuda")]["met"] is None  # not measured
    table = goals.format_goals(data)
    assert "| 3 | DINO loss fwd+bwd vs DINO's pair loop | cuda | >= 5x | 4.50x |" in table
    assert "**NOT MET**" in table and "| not measured |" in table
    assert "| cpu |" not in table  # only the devices the result ran on


def test_goals_measured_only_and_the_benchmark_runner(tmp_path):
    from benchmarks import goals

    masking_only = _results({"random_masking fwd N=64 L=196 D=768 fp32 [cpu]": {"pyssl": 1.0, "mae": 2.0}})
    assert goals.format_goals(masking_only, measured_only=True) == ""
    flow = _results({"flow warp fwd B=2 C=3 256x512 fp32 [cpu]": {"pyssl": 1.0, "grid_sample": 1.9}})
    table = goals.format_goals(flow, measured_only=True)
    assert table.count("\n") == 2 and "1.90x" in table and "**NOT MET**" in table
    path = tmp_path / "r.json"
    path.write_text(json.dumps(flow))
    assert goals.main([str(path)]) == 0
