import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import pyssl

# Hypothesis: a moderate number of fresh random examples per test in CI; more with
# HYPOTHESIS_PROFILE=thorough.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA_OK = torch.cuda.is_available() and pyssl.has_cuda_kernels()


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a pyssl build with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
