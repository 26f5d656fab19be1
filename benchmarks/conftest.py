import pytest
import torch

import pyssl


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="all", choices=["all", "cpu", "cuda"],
                     help="which devices to benchmark (cuda needs a GPU and a CUDA build)")
    parser.addoption("--bench-quick", action="store_true",
                     help="smaller configurations only (a quick look, not the figures of record)")


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
