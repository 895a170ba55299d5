// Declarations of the native CPU kernels (gates.cpp, masked_rows.cpp), bound to Python in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace nodeprune {

// An operand of a row pass: (mode, tensor, lin, column dims, activation id).
// mode 0 absent, 1 a contiguous vector over the columns, 2 a tensor of any strides whose last `column dims`
// dims are the columns, 3 hidden units act(tensor) * lin (lin may be None) of contiguous [M, C] tensors.
using Source = std::tuple<int64_t, std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t>;

// gates.cpp
void uniform(const at::Tensor& out, int64_t seed, int64_t offset);
void hard_concrete_forward(const at::Tensor& log_alpha, const at::Tensor& out, int64_t seed, int64_t offset,
                           bool training);
void hard_concrete_backward(const at::Tensor& log_alpha, const at::Tensor& dz, const at::Tensor& out, int64_t seed,
                            int64_t offset, bool training);
void feature_gates(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                   const std::vector<int64_t>& offsets, int64_t seed, bool training, const at::Tensor& out);
void level_grad(const at::Tensor& dzf, const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                const std::vector<int64_t>& offsets, int64_t seed, bool training, int64_t target,
                const at::Tensor& out);

// masked_rows.cpp
void gated_rows(const Source& a, const Source& ac, const std::optional<at::Tensor>& z, const at::Tensor& out,
                int64_t M, int64_t C);
void backward_rows(const Source& p, const std::optional<at::Tensor>& z, const Source& e, const Source& ec,
                   int64_t out_kind, const std::optional<at::Tensor>& out1, const std::optional<at::Tensor>& out2,
                   const std::optional<at::Tensor>& part, int64_t M, int64_t C);
void scale_add(const at::Tensor& acc, const std::optional<at::Tensor>& z, const Source& yc, int64_t M, int64_t C);

}  // namespace nodeprune
