"""Helpers shared by the benchmarks: device-synchronised timing, memory saved for backward,
and the grouping the report (benchmarks/report.py) turns into ratio tables."""

from __future__ import annotations

import torch

# impl names that the report treats as baselines when computing "speed-up vs baseline"
PYSSL = "pyssl"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn, inputs=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn()`` and
    still holds when it returns (with its output alive), excluding the storages of ``inputs``
    (they exist anyway). Storages saved by graphs that ``fn`` dropped before returning (e.g. a
    mask computed from a tensor that requires grad) are freed by then and not counted."""
    from torch.multiprocessing.reductions import StorageWeakRef

    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    storages: dict[int, tuple[int, StorageWeakRef]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in input_ptrs:
            storages[s.data_ptr()] = (s.nbytes(), StorageWeakRef(s))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(n for n, ref in storages.values() if not ref.expired())
    del out
    return total


def peak_memory(fn, device) -> int | None:
    """Peak memory in bytes above the starting point while running ``fn()``, after one
    warm-up call (one-time allocations such as library workspaces and pools are not the op's
    peak).

    CUDA: the caching allocator's peak. CPU: the peak of the bytes torch's CPU allocator holds,
    from the allocation and free events torch's profiler records (``profile_memory``) during
    the call, in order; None without a usable profile. pyssl's C++ kernels take their scratch
    from torch's allocator (``scratch_vector``, csrc/ops/common.h), so it counts; memory taken
    outside torch (numpy, other libraries) does not. (The process's resident set would see
    everything but proved too noisy: malloc reuses freed heap blocks in an order that made the
    same call measure 0.2 MB once and 12 MB, the size of the gradient it replaces, the next
    times.)"""
    kind = torch.device(device).type
    if kind == "cpu":
        return _cpu_peak_profiled(fn)
    if kind != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _cpu_peak_profiled(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()  # warm-up outside the profile
    # The warm-up call again inside it, so that the blocks the measured call frees (the last
    # step's gradient, say) were allocated while profiling: the profiler reports no free of a
    # block it did not see allocated.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("pyssl::peak_window"):
            fn()
    try:
        events = list(prof.profiler.kineto_results.events())
    except AttributeError:  # a torch without kineto results
        return None
    window = [e for e in events if e.name() == "pyssl::peak_window"]
    memory = [e for e in events
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    if len(window) != 1:  # no usable profile
        return None
    t0, t1 = window[0].start_ns(), window[0].start_ns() + window[0].duration_ns()
    held = peak = 0
    for e in sorted(memory, key=lambda e: e.start_ns()):
        if t0 <= e.start_ns() <= t1:
            held += e.nbytes()  # negative for a free
            peak = max(peak, held)
    return peak


def run(benchmark, fn, device, *, group: str, impl: str, rounds: int | None = None, **extra):
    """Times ``fn`` (synchronising the device after each call) under ``group``/``impl``."""
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = str(device)
    if torch.device(device).type == "cuda":
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name()
    for k, v in extra.items():
        if v is not None:
            benchmark.extra_info[k] = v

    def timed():
        r = fn()
        synchronize(device)
        return r

    timed()  # warm-up
    if rounds is None:
        return benchmark(timed)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
