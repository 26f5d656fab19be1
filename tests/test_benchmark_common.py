"""benchmarks.common.peak_memory on the CPU: the peak resident set a call adds, which counts
allocations outside torch's allocator too (the C++ kernels' std::vector scratch)."""

import sys

import numpy as np
import pytest
import torch

from benchmarks.common import peak_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the CPU peak reads Linux's /proc/self")

MB = 2**20


def _many_chunks():
    # Many medium allocations, half freed while the rest live: after the first call malloc
    # serves them from memory it kept, so only a trimmed heap shows their peak again.
    big = [torch.ones(2**18) for _ in range(64)]  # 64 x 1 MB
    small = [torch.ones(2**16) for _ in range(64)]  # 64 x 256 KB
    del big[::2]
    return small


def _two_tensors():
    x = torch.ones(16 * MB // 4)  # 16 MB, touched
    y = x + 1  # 16 MB more while x lives
    return y.sum()


def _numpy():
    return np.ones(8 * MB // 8 * 4).sum()  # 32 MB that torch's allocator never sees


@pytest.mark.parametrize("fn, expected", [(_two_tensors, 32 * MB), (_numpy, 32 * MB),
                                          (_many_chunks, 80 * MB)])
def test_cpu_peak_counts_what_the_call_touches(fn, expected):
    # each twice, after the others: memory malloc kept from earlier calls must not hide a peak
    for _ in range(2):
        for other in (_many_chunks, _two_tensors, _numpy):
            other()
        peak = peak_memory(fn, "cpu")
        assert peak is not None
        assert expected - 2 * MB <= peak <= expected + 6 * MB, (fn.__name__, peak / MB)


def test_cpu_peak_of_a_call_that_allocates_nothing_is_small():
    x = torch.ones(MB)
    assert peak_memory(lambda: x.add_(1), "cpu") < 2 * MB
