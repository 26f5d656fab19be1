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

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (``VmHWM``, reset
    through ``/proc/self/clear_refs``) above its resident set at the start, after
    ``malloc_trim`` has handed malloc's free memory back to the system (else the call could
    reuse it without the resident set growing). Unlike torch's allocator statistics this counts
    every allocation the call touches, the C++ kernels' own scratch (``std::vector``) included;
    None where Linux's ``/proc`` interface is missing."""
    kind = torch.device(device).type
    if kind == "cpu":
        return _cpu_peak_rss(fn)
    if kind != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise KeyError(key)


def _cpu_peak_rss(fn) -> int | None:
    import ctypes
    import ctypes.util
    import gc

    try:
        _proc_status_bytes("VmHWM")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, KeyError, AttributeError):
        return None
    fn()
    gc.collect()
    trim(0)
    start = _proc_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        return None
    fn()
    return max(0, _proc_status_bytes("VmHWM") - start)


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
