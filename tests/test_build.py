"""The build: extension metadata, the CLI's report, and the CMake switch PYSSL_WITH_CUDA."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import pyssl
from pyssl._native import release_cpu_scratch
from pyssl.cli import main
from pyssl.commands.info import info_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED_OPS = ["block_masking", "random_masking", "unshuffle_tokens", "unshuffle_tokens_backward"]


@pytest.mark.gpu_check
def test_build_info_matches_running_torch():
    info = pyssl.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is True
    assert pyssl.has_cuda_kernels() == info["cuda"]


@pytest.mark.gpu_check
def test_every_op_has_cpu_and_fake_kernels_and_cuda_when_built():
    for name in EXPECTED_OPS:
        qual = f"pyssl::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA") == pyssl.has_cuda_kernels(), name


@pytest.mark.gpu_check
def test_cxx_error_messages_with_numbers_do_not_crash():
    # c10::str formats integers through std::ostream. With a second, static C++ runtime linked
    # into _C (see CMakeLists.txt) this segfaulted on a GPU machine and cut the message short
    # here; a subprocess turns such a crash into a failure.
    code = ("import torch; from pyssl import ops\n"
            "try:\n"
            "    ops.unshuffle_tokens(torch.zeros(2, 3, 4), torch.tensor([[0, 1, 1, 2]] * 2),"
            " torch.zeros(4))\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the C++ error crashed the process (rc={run.returncode}): {run.stderr[-2000:]}"
    assert "(L=4) in every row; row 0 repeats 1" in run.stdout


def test_cli_version_and_info(capsys):
    out = subprocess.run([sys.executable, "-m", "pyssl", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"pyssl {pyssl.__version__}"
    text = info_text()
    assert f"torch {torch.__version__}" in text
    for name in EXPECTED_OPS:
        assert f"pyssl::{name}" in text
    assert main(["info"]) == 0
    assert "CUDA kernels in this build" in capsys.readouterr().out


def _configure(tmp_path, *defines, env=None):
    cmake = shutil.which("cmake", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    cmd = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "b"), "-G", "Ninja",
           f"-DPython_EXECUTABLE={sys.executable}", *defines]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=tmp_path)


def test_cmake_rejects_a_bad_cuda_switch(tmp_path):
    r = _configure(tmp_path, "-DPYSSL_WITH_CUDA=maybe")
    assert r.returncode != 0
    assert "PYSSL_WITH_CUDA must be AUTO, ON or OFF" in r.stdout + r.stderr


def test_cmake_off_builds_cpu_only(tmp_path):
    r = _configure(tmp_path, "-DPYSSL_WITH_CUDA=OFF")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CUDA kernels ON" not in r.stdout


def test_cmake_on_fails_loudly_without_nvcc(tmp_path):
    env = {"CUDACXX": str(tmp_path / "no-such-nvcc"), "CUDA_HOME": str(tmp_path)}
    r = _configure(tmp_path, "-DPYSSL_WITH_CUDA=ON", env=env)
    assert r.returncode != 0
    assert "PYSSL_WITH_CUDA=ON" in r.stdout + r.stderr


def test_release_cpu_scratch_hands_the_pools_back():
    feats = torch.randn(2, 3, 20, 64)
    coords = torch.rand(2, 20, 64, 2) * torch.tensor([63.0, 19.0])
    want = pyssl.ops.sample_features(feats, coords)
    fw = torch.randn(2, 2, 20, 64)
    pyssl.ops.flow_correspondence(fw, -fw)
    assert release_cpu_scratch() >= 2 * 20 * 64 * 4 * 4  # at least the interleaved images
    assert release_cpu_scratch() == 0                      # nothing left
    assert torch.equal(pyssl.ops.sample_features(feats, coords), want)  # and the kernels still work
