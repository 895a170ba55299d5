// Hard-concrete gates on the CPU: noise, samples, their gradient, and the per-feature gate of a gate stack.
//
// Gates are computed in float32 from the log_alphas (any float dtype), as the Triton kernels do, or in
// float64 for float64 log_alphas (as the reference does), and written in the output's dtype. A gate stack is a list of levels (log_alpha, group, offset): element k of
// a level gates features [k * group, (k + 1) * group) and draws its noise at Philox index offset + k.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
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

// the gates of one level, [numel], in G (float32, or float64 for the float64 path)
template <typename G>
std::vector<G> level_values(const at::Tensor& log_alpha, uint64_t seed, int64_t offset, bool training) {
  TORCH_CHECK(log_alpha.is_floating_point() && log_alpha.device().is_cpu(), "log_alpha: a CPU float tensor");
  const at::Tensor la = log_alpha.to(c10::CppTypeToScalarType<G>::value).contiguous();
  const G* a = la.const_data_ptr<G>();
  std::vector<G> z(la.numel());
  at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) z[i] = gate_value<G>(a[i], seed, offset + i, training);
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

// gates in float32, as the Triton kernels compute them, or in float64 for float64 log_alphas
#define NODEPRUNE_GATE_DISPATCH(dtype, name, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, [&] {             \
    using G = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;        \
    __VA_ARGS__();                                                                         \
  })

void hard_concrete_forward(const at::Tensor& log_alpha, const at::Tensor& out, int64_t seed, int64_t offset,
                           bool training) {
  check_cpu(out, "hard_concrete");
  TORCH_CHECK(out.numel() == log_alpha.numel() && out.scalar_type() == log_alpha.scalar_type(),
              "hard_concrete: out must be like log_alpha");
  const uint64_t key = static_cast<uint64_t>(seed);
  NODEPRUNE_GATE_DISPATCH(out.scalar_type(), "hard_concrete", [&] {
    const at::Tensor la = log_alpha.to(c10::CppTypeToScalarType<G>::value).contiguous();
    const G* a = la.const_data_ptr<G>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(gate_value<G>(a[i], key, offset + i, training));
    });
  });
}

void hard_concrete_backward(const at::Tensor& log_alpha, const at::Tensor& dz, const at::Tensor& out, int64_t seed,
                            int64_t offset, bool training) {
  check_cpu(out, "hard_concrete_backward");
  TORCH_CHECK(out.numel() == log_alpha.numel() && dz.numel() == log_alpha.numel() &&
                  out.scalar_type() == log_alpha.scalar_type(),
              "hard_concrete_backward: log_alpha, dz and out differ");
  const uint64_t key = static_cast<uint64_t>(seed);
  NODEPRUNE_GATE_DISPATCH(out.scalar_type(), "hard_concrete_backward", [&] {
    const at::Tensor la = log_alpha.to(c10::CppTypeToScalarType<G>::value).contiguous();
    const at::Tensor g = dz.to(c10::CppTypeToScalarType<G>::value).contiguous();
    const G* a = la.const_data_ptr<G>();
    const G* d = g.const_data_ptr<G>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(d[i] * gate_grad<G>(a[i], key, offset + i, training));
    });
  });
}

void feature_gates(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                   const std::vector<int64_t>& offsets, int64_t seed, bool training, const at::Tensor& out) {
  check_cpu(out, "feature_gates");
  const int64_t n = out.numel();
  check_stack(log_alphas, groups, offsets, n);
  const uint64_t key = static_cast<uint64_t>(seed);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "feature_gates: out must be float32 or float64");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "feature_gates", [&] {
    scalar_t* z = out.mutable_data_ptr<scalar_t>();
    std::fill(z, z + n, scalar_t(1));
    for (size_t l = 0; l < log_alphas.size(); ++l) {
      const std::vector<scalar_t> zl = level_values<scalar_t>(log_alphas[l], key, offsets[l], training);
      const int64_t g = groups[l];
      for (int64_t f = 0; f < n; ++f) z[f] *= zl[f / g];
    }
  });
}

void level_grad(const at::Tensor& dzf, const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& groups,
                const std::vector<int64_t>& offsets, int64_t seed, bool training, int64_t target,
                const at::Tensor& out) {
  check_cpu(out, "level_grad");
  const int64_t n = dzf.numel();
  check_stack(log_alphas, groups, offsets, n);
  TORCH_CHECK(target >= 0 && target < static_cast<int64_t>(log_alphas.size()), "level_grad: no level ", target);
  TORCH_CHECK(out.numel() == log_alphas[target].numel(), "level_grad: out must have the level's size");
  TORCH_CHECK(dzf.device().is_cpu() && dzf.is_floating_point(), "level_grad: dzf must be a CPU float tensor");
  const at::Tensor d = dzf.to(at::kDouble).contiguous();
  const uint64_t key = static_cast<uint64_t>(seed);
  NODEPRUNE_GATE_DISPATCH(out.scalar_type(), "level_grad", [&] {
    // dzf times the other levels' gates, summed in double: a block or layer gate's gradient sums every
    // feature of its block, with cancellation
    std::vector<double> w(d.const_data_ptr<double>(), d.const_data_ptr<double>() + n);
    for (size_t l = 0; l < log_alphas.size(); ++l) {
      if (static_cast<int64_t>(l) == target) continue;
      const std::vector<G> zl = level_values<G>(log_alphas[l], key, offsets[l], training);
      const int64_t g = groups[l];
      for (int64_t f = 0; f < n; ++f) w[f] *= zl[f / g];
    }
    const at::Tensor la = log_alphas[target].to(c10::CppTypeToScalarType<G>::value).contiguous();
    const G* a = la.const_data_ptr<G>();
    const int64_t g = groups[target], off = offsets[target];
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double s = 0.0;
        for (int64_t f = k * g; f < (k + 1) * g; ++f) s += w[f];
        o[k] = static_cast<scalar_t>(static_cast<G>(s) * gate_grad<G>(a[k], key, off + k, training));
      }
    });
  });
}

}  // namespace nodeprune
