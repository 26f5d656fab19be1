// The emulated build's library definition and the emulator's out-of-line parts (see
// cuda_emu.h): the error state and the fiber switch.
#include <torch/library.h>

#include "cuda_emu.h"

namespace emu {

int64_t& vector_atomics() {
  static int64_t n = 0;  // fibers run one at a time: no race
  return n;
}

std::string& failure() {
  static std::string f;
  return f;
}

cudaError_t last_error() {
  if (failure().empty()) return cudaSuccess;
  std::fprintf(stderr, "pyssl CUDA emulator: %s\n", failure().c_str());
  failure().clear();
  return cudaErrorLaunchFailure;
}

}  // namespace emu

TORCH_LIBRARY(pyssl_emu, m) {
  m.def("vector_atomics() -> int", []() -> int64_t { return emu::vector_atomics(); });
}

// pyssl_emu_switch(save_sp, load_sp): saves the callee-saved registers, the x87 control word and
// MXCSR on the current stack, stores its stack pointer in *save_sp, and resumes the context whose
// stack pointer is load_sp (laid out the same way; emu::prepare builds a fresh one).
asm(R"(
  .text
  .globl pyssl_emu_switch
  .hidden pyssl_emu_switch
  .type pyssl_emu_switch, @function
pyssl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyssl_emu_switch, .-pyssl_emu_switch
)");
