"""``pyssl info``: versions, build options, and which backends each op has."""

from __future__ import annotations


def _op_backends() -> list[tuple[str, list[str]]]:
    import torch

    import pyssl  # noqa: F401  (loads the ops)

    names = sorted({n.split("::", 1)[1].split(".")[0]
                    for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyssl::")})
    out = []
    for name in names:
        qual = f"pyssl::{name}"
        keys = [k for k in ("CPU", "CUDA", "Meta", "Autograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(qual, k)]
        out.append((name, keys))
    return out


def info_text() -> str:
    import platform

    import torch

    import pyssl

    b = pyssl.build_info()
    lines = [
        f"pyssl {pyssl.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (pyssl built against {b['torch_version']})",
        f"compiler: {b['compiler']}; OpenMP: {b['openmp']}; CPU threads: {torch.get_num_threads()}",
        f"CPU kernel build in use: {b['cpu_isa']} (PYSSL_CPU_ISA=baseline|avx2|avx512 lowers it)",
        f"CUDA kernels in this build: {b['cuda']}"
        + (f" (nvcc {b['cuda_version']}, archs {b['cuda_archs']})" if b["cuda"] else ""),
        f"CUDA device available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "ops (registered dispatch keys; 'Meta' = fake kernel for torch.compile):",
    ]
    for name, keys in _op_backends():
        lines.append(f"  pyssl::{name:<32} {', '.join(keys)}")
    return "\n".join(lines)


def run(args) -> int:
    print(info_text())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, build options and available backends")
    p.set_defaults(func=run)
