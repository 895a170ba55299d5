// Python bindings of the native CPU kernels (pybind11, through torch's cpp_extension).
// Called by nodeprune_kernels/ops/*/native_host.py; see native.h for the arguments.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nodeprune-kernels native CPU kernels: hard-concrete gates and the masked ops' row passes";
  m.def("uniform", &nodeprune::uniform, "the gate noise u of indices offset .. offset + n - 1, into out (float32)");
  m.def("hard_concrete_forward", &nodeprune::hard_concrete_forward, "z of each log_alpha, into out");
  m.def("hard_concrete_backward", &nodeprune::hard_concrete_backward, "dz * dz/dlog_alpha, into out");
  m.def("feature_gates", &nodeprune::feature_gates, "the per-feature gate of a gate stack, into out (float32)");
  m.def("level_grad", &nodeprune::level_grad, "d log_alpha of one level of a gate stack from per-feature sums");
  m.def("gated_rows", &nodeprune::gated_rows, "out = (a - a_c) * z over [M, C] rows");
  m.def("backward_rows", &nodeprune::backward_rows,
        "out1 = p * z (or the activation backward), and per-block column sums of p * (e - e_c)");
  m.def("scale_add", &nodeprune::scale_add, "acc = acc * z + y_c, in place");
}
