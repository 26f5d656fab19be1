import platform

import pytest
import torch

import pyssl


def _cpu_model() -> dict:
    """The CPU as /proc/cpuinfo names it (Linux; else platform's), with the vector extensions
    that decide which kernels run: the same "AMD EPYC" can be a Zen 2 without AVX-512 or a Zen 5
    with it, and torch's baselines run 2-3x faster on the latter (benchmarks/RESULTS.md)."""
    info = {"name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(name=fields.get("model name", info["name"]), family=fields.get("cpu family"),
                model=fields.get("model"),
                vector=[x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags])
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    """Records what decides the figures beyond the CPU's brand (report.format_table prints it)."""
    machine_info["pyssl"] = {
        "version": pyssl.__version__,
        "cpu_kernels": pyssl.build_info()["cpu_isa"],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="all", choices=["all", "cpu", "cuda"],
                     help="which devices to benchmark (cuda needs a GPU and a CUDA build)")
    parser.addoption("--bench-quick", action="store_true",
                     help="smaller configurations only (a quick look, not the figures of record)")
    parser.addoption("--bench-full", action="store_true",
                     help="also the configurations a CPU run skips for time (bench_flow: B=8, C=256)")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        choice = metafunc.config.getoption("--bench-device")
        devices = []
        if choice in ("all", "cpu"):
            devices.append("cpu")
        if choice in ("all", "cuda") and torch.cuda.is_available() and pyssl.has_cuda_kernels():
            devices.append("cuda")
        metafunc.parametrize("device", devices)


@pytest.fixture
def quick(request):
    return request.config.getoption("--bench-quick")


@pytest.fixture
def full(request):
    return request.config.getoption("--bench-full")
