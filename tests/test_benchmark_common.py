"""benchmarks.common.peak_memory on the CPU: the peak of the bytes torch's allocator holds during
a call, from the profiler's allocation and free events."""

import numpy as np
import pytest
import torch

from benchmarks.common import peak_memory

MB = 2**20


def _many_chunks():
    big = [torch.ones(2**18) for _ in range(64)]  # 64 x 1 MB
    small = [torch.ones(2**16) for _ in range(64)]  # 64 x 256 KB
    del big[::2]
    return small  # freed after the call: the peak was 80 MB


def _two_tensors():
    x = torch.ones(16 * MB // 4)  # 16 MB
    y = x + 1  # 16 MB more while x lives
    return y.sum()


@pytest.mark.parametrize("fn, expected", [(_two_tensors, 32 * MB), (_many_chunks, 80 * MB)])
def test_cpu_peak_counts_what_the_call_allocates(fn, expected):
    for _ in range(2):  # repeatable: the same call measures the same
        peak = peak_memory(fn, "cpu")
        assert peak is not None
        assert expected <= peak <= expected + MB // 8, (fn.__name__, peak / MB)


def test_cpu_peak_of_a_step_that_replaces_its_gradient_is_what_it_adds():
    # a training step drops last step's gradient, allocates a little, then a new gradient of
    # the same size: beyond the gradient it started with, it needs only the little. The block
    # it frees was allocated by the call before; a profile that does not see that allocation
    # reports no free, and the new gradient would show as a 12 MB peak.
    state = {"grad": torch.ones(3 * MB)}  # 12 MB

    def step():
        state["grad"] = None
        small = [torch.ones(1000) for _ in range(50)]
        state["grad"] = torch.ones(3 * MB)
        return small

    peaks = [peak_memory(step, "cpu") for _ in range(3)]
    assert max(peaks) < MB, [p / MB for p in peaks]


def test_cpu_peak_does_not_see_memory_outside_torch():
    # documented: numpy's (or a C++ kernel's std::vector) memory is not torch's allocator's
    x = torch.ones(MB)
    assert peak_memory(lambda: np.ones(4 * MB).sum(), "cpu") < MB // 8
    assert peak_memory(lambda: x.add_(1), "cpu") < MB // 8
