// Hard-concrete gates on the CPU: the Philox4x32-10 noise stream and the gate formulas.
//
// The noise of gate i under key `seed` is the first 32-bit output of Philox4x32-10 with counter
// (i, 0, 0, 0) and key (seed_lo, seed_hi), turned into a float exactly as Triton's tl.rand does, then
// clamped to [eps, 1 - eps]. The Triton kernels (ops/hard_concrete/kernels.py) and the plain-PyTorch
// reference (ops/hard_concrete/reference.py) draw the same bits, so every backend samples the same gates.
// Plain C++: no ATen here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace nodeprune {

constexpr float kEps = 1e-6f;
// the Python constants (ops/hard_concrete/reference.py), rounded to the gate's float type where used
constexpr double kGamma = -0.1;
constexpr double kStretch = 1.1 - (-0.1);  // zeta - gamma
constexpr double kInvBeta = 1.5;           // 1 / beta
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's int32 -> [0, 1) scale

inline uint32_t philox_uint32(uint64_t seed, uint32_t index) {
  uint32_t c0 = index, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// float32 in [0, 1): exactly tl.rand(seed, index)
inline float philox_uniform(uint64_t seed, int64_t index) {
  int32_t x = static_cast<int32_t>(philox_uint32(seed, static_cast<uint32_t>(index)));
  if (x < 0) x = ~x;  // Triton: where(x < 0, -x - 1, x)
  return static_cast<float>(x) * kUniformScale;
}

// the hard-concrete noise u in [eps, 1 - eps]
inline float gate_uniform(uint64_t seed, int64_t index) {
  return std::min(std::max(philox_uniform(seed, index), kEps), 1.0f - kEps);
}

// The gate formulas in float32, or in float64 for float64 log_alphas (as the reference computes them);
// the noise u is float32 either way.
template <typename F>
inline F stretched_sigmoid(F log_alpha, uint64_t seed, int64_t index, bool training) {
  F x = log_alpha;
  if (training) {
    const F u = static_cast<F>(gate_uniform(seed, index));
    x = (std::log(u) - std::log(F(1) - u) + log_alpha) * F(kInvBeta);
  }
  return F(1) / (F(1) + std::exp(-x));
}

// the gate z in [0, 1] of log_alpha at global gate `index`
template <typename F>
inline F gate_value(F log_alpha, uint64_t seed, int64_t index, bool training) {
  const F s = stretched_sigmoid(log_alpha, seed, index, training);
  return std::min(std::max(s * F(kStretch) + F(kGamma), F(0)), F(1));
}

// dz / dlog_alpha, zero where the clamp is active
template <typename F>
inline F gate_grad(F log_alpha, uint64_t seed, int64_t index, bool training) {
  const F s = stretched_sigmoid(log_alpha, seed, index, training);
  const F y = s * F(kStretch) + F(kGamma);
  const F scale = training ? F(kStretch) * F(kInvBeta) : F(kStretch);
  return (y > F(0) && y < F(1)) ? scale * s * (F(1) - s) : F(0);
}

}  // namespace nodeprune
