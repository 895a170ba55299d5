// Hard-concrete gates on the CPU: noise, samples, their gradient, and the per-feature gate of a gate stack.
//
// Everything is computed in float32 from the log_alphas (any float dtype) and written in the output's
// dtype, as the Triton kernels do. A gate stack is a list of levels (log_alpha, group, offset): element k of
// a level gates features [k * group, (k + 1) * group) and draws its noise at Philox index offset + k.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "native.h"
#include "philox.h"

namespace nodeprune {
namespace {

constexpr int64_t kGrain = 2048;

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": the native backend takes CPU tensors, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, ": expected a contiguous tensor");
}

// float32 copy of a log_alpha (or any float tensor), contiguous
at::Tensor as_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_floating_point(), what, ": expected a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), what, ": the native backend takes CPU tensors, got ", t.device());
  return t.to(at::kFloat).contiguous();
}

// the float32 gates of one level, [numel]
std::vector<float> level_values(const at::Tensor& log_alpha, uint64_t seed, int64_t offset, bool training) {
  const at::Tensor la = as_float(log_alpha, "log_alpha");
  const float* a = la.const_data_ptr<float>();
  std::vector<float> z(la.numel());
  at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) z[i] = gate_value(a[i], seed, offset + i, training);
  });
  return z;
}

void check_stack(const std::vector<at::Tensor>& las, const std::vector<int64_t>& groups,
                 const std::vector<int64_t>& offsets, int64_t n_features) {
  TORCH_CHECK(las.size() == groups.size() && las.size() == offsets.size(),
              "gate stack: one group and one offset per level");
  for (size_t l = 0; l < las.size(); ++l) {
    TORCH_CHECK(groups[l] >= 1 && las[l].numel() * groups[l] == n_features, "gate stack level ", l, ": ",
                las[l].numel(), " gates x group ", groups[l], " do not tile ", n_features, " features");
  }
}

}  // namespace

void uniform(const at::Tensor& out, int64_t seed, int64_t offset) {
  check_cpu(out, "uniform");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "uniform: out must be float32");
  float* o = out.mutable_data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = gate_uniform(key, offset + i);
  });
}

void hard_concrete_forward(const at::Tensor& log_alpha, const at::Tensor& out, int64_t seed, int64_t offset,
                           bool training) {
  check_cpu(out, "hard_concrete");
  TORCH_CHECK(out.numel() == log_alpha.numel(), "hard_concrete: out and log_alpha differ in size");
  const at::Tensor la = as_float(log_alpha, "hard_concrete");
  const float* a = la.const_data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hard_concrete", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(gate_value(a[i], key, offset + i, training));
    });
  });
}

void hard_concrete_backward(const at::Tensor& log_alpha, const at::Tensor& dz, const at::Tensor& out, int64_t seed,
                            int64_t offset, bool training) {
  check_cpu(out, "hard_concrete_backward");
  TORCH_CHECK(out.numel() == log_alpha.numel() && dz.numel() == log_alpha.numel(),
              "hard_concrete_backward: log_alpha, dz and out differ in size");
  const at::Tensor la = as_float(log_alpha, "hard_concrete_backward");
  const at::Tensor g = as_float(dz, "hard_concrete_backward: dz");
  const float* a = la.const_data_ptr<float>();
  const float* d = g.const_data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hard_concrete_backward", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        o[i] = static_cast<scalar_t>(d[i] * gate_grad(a[i], key, offset + i, training));
      }
    });
  });
}

void feature_gates(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                   const std::vector<int64_t>& offsets, int64_t seed, bool training, const at::Tensor& out) {
  check_cpu(out, "feature_gates");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "feature_gates: out must be float32");
  const int64_t n = out.numel();
  check_stack(log_alphas, groups, offsets, n);
  float* z = out.mutable_data_ptr<float>();
  std::fill(z, z + n, 1.0f);
  const uint64_t key = static_cast<uint64_t>(seed);
  for (size_t l = 0; l < log_alphas.size(); ++l) {
    const std::vector<float> zl = level_values(log_alphas[l], key, offsets[l], training);
    const int64_t g = groups[l];
    for (int64_t f = 0; f < n; ++f) z[f] *= zl[f / g];
  }
}

void level_grad(const at::Tensor& dzf, const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                const std::vector<int64_t>& offsets, int64_t seed, bool training, int64_t target,
                const at::Tensor& out) {
  check_cpu(out, "level_grad");
  const int64_t n = dzf.numel();
  check_stack(log_alphas, groups, offsets, n);
  TORCH_CHECK(target >= 0 && target < static_cast<int64_t>(log_alphas.size()), "level_grad: no level ", target);
  TORCH_CHECK(out.numel() == log_alphas[target].numel(), "level_grad: out must have the level's size");
  const at::Tensor d = as_float(dzf, "level_grad: dzf");
  const uint64_t key = static_cast<uint64_t>(seed);
  // dzf times the other levels' gates: the sum over a gate's features of what multiplies it
  std::vector<float> w(d.const_data_ptr<float>(), d.const_data_ptr<float>() + n);
  for (size_t l = 0; l < log_alphas.size(); ++l) {
    if (static_cast<int64_t>(l) == target) continue;
    const std::vector<float> zl = level_values(log_alphas[l], key, offsets[l], training);
    const int64_t g = groups[l];
    for (int64_t f = 0; f < n; ++f) w[f] *= zl[f / g];
  }
  const at::Tensor la = as_float(log_alphas[target], "level_grad: log_alpha");
  const float* a = la.const_data_ptr<float>();
  const int64_t g = groups[target], off = offsets[target];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "level_grad", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        float s = 0.0f;
        for (int64_t f = k * g; f < (k + 1) * g; ++f) s += w[f];
        o[k] = static_cast<scalar_t>(s * gate_grad(a[k], key, off + k, training));
      }
    });
  });
}

}  // namespace nodeprune
