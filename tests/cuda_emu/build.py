"""Builds pyssl's CUDA glue and kernels for the CUDA emulator (cuda_emu.h), as a torch library
`pyssl_emu` whose CPU implementations are the CUDA code paths: `torch.ops.pyssl_emu.dino_loss`
on CPU tensors runs csrc/ops/dino_loss_cuda.cpp and the kernels of csrc/kernels/dino_loss.cu,
block by block, thread by thread. Tests compare it with `torch.ops.pyssl.*` on the CPU, so the
CUDA code's indexing, workspace sizes, reductions and launch configurations are checked on a
machine without a GPU (tests/ops/test_cuda_emulated.py).

The sources are copied into a build directory and rewritten:
- csrc/kernels/*.cu -> .cpp that include cuda_emu.h first; `k<<<cfg>>>(args)` becomes
  `::emu::launch(::emu::Cfg(cfg), k, args)`; `extern __shared__ T x[];` becomes a pointer to the
  launch's dynamic shared memory.
- csrc/ops/<family>_cuda.cpp: registered as the CPU implementation of `pyssl_emu` (this
  directory's ops/cuda_utils.h replaces the CUDA stream and device guard).
- csrc/ops/<family>.cpp: its schemas go to `pyssl_emu`; its CPU registrations are dropped (it
  still provides the checks the glue shares).
"""
from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

# kernel (with template arguments, nested one level: k<F, acc_t<F>, Add>) <<<cfg>>> (
_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<(?:[^<>;{}]|<[^<>;{}]*>)*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.S)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*)\s+(\w+)\[\];")


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h and friends), or None: from CUDA_HOME,
    CUDA_PATH, the nvcc on PATH, /usr/local/cuda, or the system headers (Debian's toolkit)."""
    import shutil

    nvcc = shutil.which("nvcc")
    bases = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parents[1]) if nvcc else None, "/usr/local/cuda", "/usr"]
    for base in bases:
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    return None


_SHARED = re.compile(r"(?<![\w:])__shared__\s+(?!__align__)([^;]*);")


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets and parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[(<"
        depth -= ch in "])>"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _fill_static_shared(m: re.Match) -> str:
    """`__shared__ T a[..], b[..];` -> the same declaration, then a call that fills each array
    with 0xFF bytes (NaN floats) at the first thread of each block to get there: on a GPU a block
    finds garbage in shared memory, in the emulator a static array would keep the last block's
    values (or zeros), hiding reads of entries the block never wrote."""
    names = [re.match(r"\s*(?:.*\s)?(\w+)\s*\[", part, re.S) for part in _split_top(m.group(1))]
    if not all(names):
        raise RuntimeError(f"a shared declaration the emulator's rewrite does not recognise: {m.group(0)}")
    return m.group(0) + "".join(f" ::emu::shared_fill({n.group(1)}, sizeof({n.group(1)}));" for n in names)


def rewrite_kernels(src: str) -> str:
    def launch(m: re.Match) -> str:
        kernel, cfg, empty = m.group(1), " ".join(m.group(2).split()), m.group(3)
        return f"::emu::launch(::emu::Cfg({cfg}), {kernel}" + (")" if empty else ", ")

    out, n = _LAUNCH.subn(launch, src)
    if "<<<" in out:
        raise RuntimeError("a kernel launch the emulator's rewrite does not recognise")
    out = _SHARED.sub(_fill_static_shared, out.replace("extern __shared__", "extern __SHARED_EXTERN__"))
    out = out.replace("extern __SHARED_EXTERN__", "extern __shared__")
    out = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::emu::dynamic_smem());",
        out)
    return '#include "cuda_emu.h"\n' + out


def rewrite_glue(src: str) -> str:
    out, n = re.subn(r"TORCH_LIBRARY_IMPL\(pyssl,\s*CUDA,", "TORCH_LIBRARY_IMPL(pyssl_emu, CPU,", src)
    if n != 1:
        raise RuntimeError("expected one CUDA registration block in a *_cuda.cpp file")
    return out


def rewrite_cpu(src: str) -> str:
    out = re.sub(r"TORCH_LIBRARY_FRAGMENT\(pyssl,", "TORCH_LIBRARY_FRAGMENT(pyssl_emu,", src)
    out = re.sub(r"TORCH_LIBRARY_IMPL\(pyssl,\s*(\w+),\s*(\w+)\)",
                 r"[[maybe_unused]] static void pyssl_emu_unused_\1_impl(torch::Library& \2)", out)
    if "TORCH_LIBRARY" in out.replace("TORCH_LIBRARY_FRAGMENT(pyssl_emu,", ""):
        raise RuntimeError("an op registration the emulator's rewrite does not recognise")
    return out


def sources(build: Path) -> list[str]:
    """Writes the rewritten sources into `build` and returns every source to compile."""
    (build / "kernels").mkdir(parents=True, exist_ok=True)
    (build / "ops").mkdir(parents=True, exist_ok=True)
    out = [str(HERE / "emu_module.cpp")]
    for cu in sorted((CSRC / "kernels").glob("*.cu")):
        dst = build / "kernels" / (cu.stem + "_kernels_emu.cpp")
        _write(dst, rewrite_kernels(cu.read_text()))
        out.append(str(dst))
    for cpp in sorted((CSRC / "ops").glob("*.cpp")):
        glue = cpp.stem.endswith("_cuda")
        dst = build / "ops" / (cpp.stem + "_emu.cpp")
        _write(dst, (rewrite_glue if glue else rewrite_cpu)(cpp.read_text()))
        out.append(str(dst))
    out += [str(p) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    return out


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # keep mtimes: ninja rebuilds what changed
        path.write_text(text)


def asan_runtime() -> str | None:
    """g++'s AddressSanitizer runtime (to LD_PRELOAD into Python), or None."""
    import subprocess

    try:
        path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def load(verbose: bool = False, asan: bool | None = None):
    """Builds (or reuses) the emulated library and loads it: torch.ops.pyssl_emu.*.

    asan (default: the PYSSL_EMU_ASAN environment variable): build with AddressSanitizer on
    heap and global memory (not the fiber stacks), in a build directory of its own; the process
    must then have the ASan runtime preloaded (asan_runtime()). Reads or writes past a tensor's
    end, or past a kernel's shared memory, then stop the process with a report.
    """
    import torch
    from torch.utils import cpp_extension

    inc = cuda_include()
    if inc is None:
        raise RuntimeError("the CUDA emulator needs the CUDA toolkit's headers (cuda_fp16.h); "
                           "set CUDA_HOME")
    # One build directory per source tree and torch version.
    key = hashlib.sha1(f"{ROOT}|{torch.__version__}|{sysconfig.get_platform()}".encode()).hexdigest()[:12]
    if asan is None:
        asan = os.environ.get("PYSSL_EMU_ASAN", "") not in ("", "0")
    suffix = "_asan" if asan else ""
    build = Path(os.environ.get("PYSSL_EMU_BUILD", Path.home() / ".cache" / "pyssl" / f"cuda_emu_{key}"))
    build = build.with_name(build.name + suffix)
    build.mkdir(parents=True, exist_ok=True)
    srcs = sources(build / "src")
    # The fibers' stacks are heap blocks that ASan's stack bookkeeping does not know: it checks
    # heap and globals (tensors, the kernels' shared memory), not stack frames.
    san = ["-fsanitize=address", "-fno-omit-frame-pointer", "--param", "asan-stack=0"] if asan else []
    cpp_extension.load(
        name="pyssl_cuda_emu" + suffix,
        sources=srcs,
        # (never -I/usr/include: it breaks libstdc++'s #include_next)
        extra_include_paths=[str(HERE), str(CSRC)] + ([str(inc)] if str(inc) != "/usr/include" else []),
        extra_cflags=["-O1", "-fvisibility=hidden", "-Wno-unused-function", "-Wno-attributes",
                      "-fopenmp"] + san,
        extra_ldflags=["-fopenmp"] + (["-fsanitize=address"] if asan else []),
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.pyssl_emu
