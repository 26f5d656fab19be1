// The Python module pyssl._C. Importing it runs the TORCH_LIBRARY registrations of every op
// family (csrc/ops/*.cpp); its Python-level functions report how it was built and free the
// scratch the CPU kernels keep between calls.
#include <Python.h>

#include <torch/library.h>

#include <string>

#include "cpu/simd.h"
#include "ops/quad.h"

#ifndef PYSSL_VERSION
#define PYSSL_VERSION "unknown"
#endif
#ifndef PYSSL_TORCH_VERSION
#define PYSSL_TORCH_VERSION "unknown"
#endif

// The namespace is defined once here; each op family adds to it with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(pyssl, m) {}

namespace {

std::string build_info_json() {
  std::string s = "{";
  s += "\"version\": \"" PYSSL_VERSION "\"";
  s += ", \"torch_version\": \"" PYSSL_TORCH_VERSION "\"";
#ifdef PYSSL_WITH_CUDA
  s += ", \"cuda\": true";
  s += ", \"cuda_version\": \"" PYSSL_CUDA_VERSION "\"";
  s += ", \"cuda_archs\": \"" PYSSL_CUDA_ARCHS "\"";
#else
  s += ", \"cuda\": false";
  s += ", \"cuda_version\": null";
  s += ", \"cuda_archs\": null";
#endif
#ifdef _OPENMP
  s += ", \"openmp\": true";
#else
  s += ", \"openmp\": false";
#endif
#if defined(__clang__)
  s += ", \"compiler\": \"clang " __clang_version__ "\"";
#elif defined(__GNUC__)
  s += ", \"compiler\": \"gcc " __VERSION__ "\"";
#else
  s += ", \"compiler\": \"unknown\"";
#endif
  s += std::string(", \"cpu_isa\": \"") + pyssl::cpu::cpu_isa_name() + "\"";
  s += "}";
  return s;
}

PyObject* build_info(PyObject*, PyObject*) {
  const std::string s = build_info_json();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

PyObject* release_cpu_scratch(PyObject*, PyObject*) {
  return PyLong_FromLongLong(pyssl::release_quad_scratch());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "JSON string describing how pyssl._C was built."},
    {"release_cpu_scratch", release_cpu_scratch, METH_NOARGS,
     "Frees the scratch the CPU kernels keep between calls; returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pyssl native ops", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  pyssl::cpu::cpu_has_avx512();  // latch PYSSL_CPU_ISA now: later changes to it have no effect
  return PyModule_Create(&module_def);
}
