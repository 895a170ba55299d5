// The elementwise halves of the masked ops on the CPU; the GEMMs between them are ATen's (BLAS).
//
// Every masked projection is  y' = y_c + z_out * (((A - A_c) * z_in) W^T)  (DESIGN.md section 4), with A
// the layer input x (masked linear, attention output projection) or the MLP's hidden units
// h = act(pre) * lin rebuilt from the saved pre-activations. Three passes over [M, C] rows serve the
// forward and the backward of all of them:
//
//   gated_rows     out = (A - A_c) * z                        the GEMM operand (forward; dy * z_out; recompute)
//   backward_rows  out = P * z  (OUT_KIND 0: dx)  or the activation backward of dh = P * z (OUT_KIND 1:
//                  d pre = dh * lin * act'(pre), d lin = dh * act(pre)), and in the same pass the column
//                  sums part[block, c] = sum over the block's rows of P * (E - E_c) (accumulated in float64)
//   scale_add      acc = acc * z + Y_c                        the GEMM's epilogue, in place
//
// An operand ("source") is read where it lies: absent (mode 0), a vector over the columns (1), a tensor of
// any strides whose last `col_dims` dims are the columns (2), or hidden units act(pre) * lin built from
// contiguous [M, C] pre-activations (3). Arithmetic is in float32 (float64 for double tensors), and so are
// the gates, vectors over the columns. Column sums are taken per block of kBlockRows rows and the blocks are
// added in order afterwards, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "native.h"

namespace nodeprune {
namespace {

constexpr int64_t kBlockRows = 32;

enum Mode : int64_t { kNone = 0, kVector = 1, kTensor = 2, kHidden = 3 };
enum Act : int64_t { kSilu = 1, kGelu = 2, kGeluTanh = 3, kRelu = 4 };

template <typename A>
inline A sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}

// act(x) and act'(x); the constants as in ops/gated_gemm/kernels.py
template <typename A>
inline void act_and_grad(int64_t act, A x, A& a, A& da) {
  switch (act) {
    case kSilu: {
      const A s = sigmoid(x);
      a = x * s;
      da = s * (A(1) + x * (A(1) - s));
      return;
    }
    case kGelu: {
      const A cdf = A(0.5) * (A(1) + std::erf(x * A(0.7071067811865476)));
      a = x * cdf;
      da = cdf + x * A(0.3989422804014327) * std::exp(A(-0.5) * x * x);
      return;
    }
    case kGeluTanh: {
      const A s = sigmoid(x * (A(1.5957691216057308) + A(0.0713548162726009) * x * x));
      a = x * s;
      da = s + x * s * (A(1) - s) * (A(1.5957691216057308) + A(3) * A(0.0713548162726009) * x * x);
      return;
    }
    default:
      a = x > A(0) ? x : A(0);
      da = x > A(0) ? A(1) : A(0);
  }
}

template <typename A>
inline A act_value(int64_t act, A x) {
  switch (act) {
    case kSilu:
      return x * sigmoid(x);
    case kGelu:
      return A(0.5) * x * (A(1) + std::erf(x * A(0.7071067811865476)));
    case kGeluTanh:
      return x * sigmoid(x * (A(1.5957691216057308) + A(0.0713548162726009) * x * x));
    default:
      return x > A(0) ? x : A(0);
  }
}

// One operand of a pass, read row by row into a buffer of opmath values.
template <typename T>
struct Rows {
  using A = at::opmath_type<T>;
  int64_t mode = kNone;
  int64_t act = 0;
  const T* p = nullptr;
  const T* u = nullptr;          // hidden: lin, or nullptr for a non-gated MLP
  std::vector<int64_t> row_off;  // tensor: offset of each row, in elements
  std::vector<int64_t> col_off;  // tensor: offset of each column
  bool unit_cols = true;         // tensor: col_off[c] == c

  Rows(const Source& src, int64_t M, int64_t C, const char* what) {
    mode = std::get<0>(src);
    act = std::get<4>(src);
    if (mode == kNone) return;
    TORCH_CHECK(std::get<1>(src).has_value(), what, ": operand mode ", mode, " without a tensor");
    const at::Tensor& t = *std::get<1>(src);
    TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<T>::value, what, ": dtype ", t.scalar_type(),
                " differs from the pass's ", c10::CppTypeToScalarType<T>::value);
    TORCH_CHECK(t.device().is_cpu(), what, ": the native backend takes CPU tensors");
    p = t.const_data_ptr<T>();
    if (mode == kVector) {
      TORCH_CHECK(t.dim() == 1 && t.numel() == C && t.is_contiguous(), what, ": a vector operand must be a "
                  "contiguous [", C, "], got ", t.sizes());
      return;
    }
    if (mode == kHidden) {
      TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == C && t.is_contiguous(), what,
                  ": hidden pre-activations must be contiguous [", M, ", ", C, "], got ", t.sizes());
      if (std::get<2>(src).has_value()) {
        const at::Tensor& l = *std::get<2>(src);
        TORCH_CHECK(l.sizes() == t.sizes() && l.is_contiguous() && l.scalar_type() == t.scalar_type(), what,
                    ": lin must be contiguous like pre");
        u = l.const_data_ptr<T>();
      }
      TORCH_CHECK(act >= kSilu && act <= kRelu, what, ": unknown activation id ", act);
      return;
    }
    TORCH_CHECK(mode == kTensor, what, ": unknown operand mode ", mode);
    const int64_t col_dims = std::get<3>(src);
    TORCH_CHECK(col_dims >= 1 && col_dims <= t.dim(), what, ": ", col_dims, " column dims for a ", t.dim(),
                "-d tensor");
    const int64_t lead = t.dim() - col_dims;
    int64_t m_total = 1, c_total = 1;
    for (int64_t d = 0; d < lead; ++d) m_total *= t.size(d);
    for (int64_t d = lead; d < t.dim(); ++d) c_total *= t.size(d);
    TORCH_CHECK(m_total == M && c_total == C, what, ": shape ", t.sizes(), " is not [", M, " rows, ", C,
                " columns]");
    row_off = offsets(t, 0, lead, M);
    col_off = offsets(t, lead, t.dim(), C);
    for (int64_t c = 0; c < C; ++c) unit_cols = unit_cols && col_off[c] == c;
  }

  // element offsets of the row-major enumeration of dims [d0, d1) of t
  static std::vector<int64_t> offsets(const at::Tensor& t, int64_t d0, int64_t d1, int64_t n) {
    std::vector<int64_t> off(n);
    std::vector<int64_t> idx(d1 - d0, 0);
    int64_t cur = 0;
    for (int64_t i = 0; i < n; ++i) {
      off[i] = cur;
      for (int64_t d = d1 - 1; d >= d0; --d) {  // increment the mixed-radix counter
        const int64_t k = d - d0;
        if (++idx[k] < t.size(d)) {
          cur += t.stride(d);
          break;
        }
        cur -= (idx[k] - 1) * t.stride(d);
        idx[k] = 0;
      }
    }
    return off;
  }

  bool present() const { return mode != kNone; }

  // buf[c] = element (m, c), c < C
  void load(int64_t m, int64_t C, A* buf) const {
    switch (mode) {
      case kNone:
        for (int64_t c = 0; c < C; ++c) buf[c] = A(0);
        return;
      case kVector:
        for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(p[c]);
        return;
      case kTensor: {
        const T* r = p + row_off[m];
        if (unit_cols) {
          for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(r[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(r[col_off[c]]);
        }
        return;
      }
      default: {
        const T* r = p + m * C;
        for (int64_t c = 0; c < C; ++c) buf[c] = act_value(act, static_cast<A>(r[c]));
        if (u != nullptr) {
          const T* ru = u + m * C;
          for (int64_t c = 0; c < C; ++c) buf[c] *= static_cast<A>(ru[c]);
        }
      }
    }
  }
};

// the per-column gates: float32, or float64 for a float64 pass (opmath A)
template <typename A>
const A* gate_ptr(const std::optional<at::Tensor>& z, int64_t C, const char* what) {
  if (!z.has_value()) return nullptr;
  TORCH_CHECK(z->scalar_type() == c10::CppTypeToScalarType<A>::value && z->dim() == 1 && z->numel() == C &&
                  z->is_contiguous(),
              what, ": gates must be a contiguous ", c10::CppTypeToScalarType<A>::value, " [", C, "], got ",
              z->scalar_type(), " ", z->sizes());
  return z->const_data_ptr<A>();
}

template <typename T>
T* out_ptr(const std::optional<at::Tensor>& out, int64_t M, int64_t C, const char* what) {
  if (!out.has_value()) return nullptr;
  TORCH_CHECK(out->scalar_type() == c10::CppTypeToScalarType<T>::value && out->is_contiguous() &&
                  out->numel() == M * C,
              what, ": the output must be a contiguous ", c10::CppTypeToScalarType<T>::value, " tensor of ", M,
              " x ", C, " elements");
  return out->mutable_data_ptr<T>();
}

// rows [begin, end) in blocks of kBlockRows, in parallel over blocks; a pass over fewer than
// kParallelElements elements runs on the calling thread (a parallel region costs more than it saves there)
constexpr int64_t kParallelElements = 1 << 16;

template <typename F>
void for_row_blocks(int64_t M, int64_t C, F f) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, kBlockRows * C));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b, b * kBlockRows, std::min(M, (b + 1) * kBlockRows));
  });
}

template <typename T>
void gated_rows_impl(const Source& a_src, const Source& ac_src, const std::optional<at::Tensor>& z,
                     const at::Tensor& out, int64_t M, int64_t C) {
  using A = at::opmath_type<T>;
  const Rows<T> a(a_src, M, C, "gated_rows: a"), ac(ac_src, M, C, "gated_rows: a_c");
  const A* zp = gate_ptr<A>(z, C, "gated_rows");
  T* o = out_ptr<T>(out, M, C, "gated_rows");
  for_row_blocks(M, C, [&](int64_t, int64_t m0, int64_t m1) {
    std::vector<A> buf(C), bc(ac.present() ? C : 0);
    for (int64_t m = m0; m < m1; ++m) {
      a.load(m, C, buf.data());
      if (ac.present()) {
        ac.load(m, C, bc.data());
        for (int64_t c = 0; c < C; ++c) buf[c] -= bc[c];
      }
      T* r = o + m * C;
      if (zp != nullptr) {
        for (int64_t c = 0; c < C; ++c) r[c] = static_cast<T>(buf[c] * zp[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) r[c] = static_cast<T>(buf[c]);
      }
    }
  });
}

template <typename T>
void backward_rows_impl(const Source& p_src, const std::optional<at::Tensor>& z, const Source& e_src,
                        const Source& ec_src, int64_t out_kind, const std::optional<at::Tensor>& out1,
                        const std::optional<at::Tensor>& out2, const std::optional<at::Tensor>& part, int64_t M,
                        int64_t C) {
  using A = at::opmath_type<T>;
  const Rows<T> pr(p_src, M, C, "backward_rows: p"), e(e_src, M, C, "backward_rows: e"),
      ec(ec_src, M, C, "backward_rows: e_c");
  const A* zp = gate_ptr<A>(z, C, "backward_rows");
  T* o1 = out_ptr<T>(out1, M, C, "backward_rows: out1");
  T* o2 = out_ptr<T>(out2, M, C, "backward_rows: out2");
  TORCH_CHECK(out_kind == 0 || out_kind == 1, "backward_rows: out_kind must be 0 or 1");
  TORCH_CHECK(out_kind == 0 || o1 == nullptr || e.mode == kHidden,
              "backward_rows: the activation backward (out_kind 1) reads the pre-activations from a hidden e");
  TORCH_CHECK(o2 == nullptr || (out_kind == 1 && e.u != nullptr), "backward_rows: out2 is d lin of a gated MLP");
  double* sums = nullptr;  // a gate's gradient is a cancelling sum over many terms: accumulate in double
  if (part.has_value()) {
    const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
    TORCH_CHECK(part->scalar_type() == at::kDouble && part->is_contiguous() && part->numel() == blocks * C,
                "backward_rows: part must be a contiguous float64 [", blocks, ", ", C, "]");
    TORCH_CHECK(e.present(), "backward_rows: column sums need e");
    sums = part->mutable_data_ptr<double>();
  }
  const bool hidden_out = out_kind == 1 && o1 != nullptr;
  for_row_blocks(M, C, [&](int64_t block, int64_t m0, int64_t m1) {
    std::vector<A> pb(C), eb(sums != nullptr && !hidden_out ? C : 0), cb(ec.present() ? C : 0);
    double* acc = sums != nullptr ? sums + block * C : nullptr;
    if (acc != nullptr) std::fill(acc, acc + C, 0.0);
    for (int64_t m = m0; m < m1; ++m) {
      pr.load(m, C, pb.data());
      if (ec.present()) ec.load(m, C, cb.data());
      if (hidden_out) {  // the activation backward, and h itself for the sums, in one sweep over pre / lin
        const T* pre = e.p + m * C;
        const T* lin = e.u != nullptr ? e.u + m * C : nullptr;
        T* d_pre = o1 + m * C;
        T* d_lin = o2 != nullptr ? o2 + m * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          A a, da;
          act_and_grad(e.act, static_cast<A>(pre[c]), a, da);
          const A l = lin != nullptr ? static_cast<A>(lin[c]) : A(1);
          const A dh = zp != nullptr ? pb[c] * zp[c] : pb[c];
          d_pre[c] = static_cast<T>(dh * l * da);
          if (d_lin != nullptr) d_lin[c] = static_cast<T>(dh * a);
          if (acc != nullptr) acc[c] += pb[c] * (a * l - (ec.present() ? cb[c] : A(0)));
        }
        continue;
      }
      if (acc != nullptr) {  // before out1: out1 may be p's own storage
        e.load(m, C, eb.data());
        if (ec.present()) {
          for (int64_t c = 0; c < C; ++c) acc[c] += pb[c] * (eb[c] - cb[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) acc[c] += pb[c] * eb[c];
        }
      }
      if (o1 != nullptr) {
        T* r = o1 + m * C;
        if (zp != nullptr) {
          for (int64_t c = 0; c < C; ++c) r[c] = static_cast<T>(pb[c] * zp[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) r[c] = static_cast<T>(pb[c]);
        }
      }
    }
  });
}

template <typename T>
void scale_add_impl(const at::Tensor& acc, const std::optional<at::Tensor>& z, const Source& yc_src, int64_t M,
                    int64_t C) {
  using A = at::opmath_type<T>;
  const Rows<T> yc(yc_src, M, C, "scale_add: y_c");
  const A* zp = gate_ptr<A>(z, C, "scale_add");
  T* o = out_ptr<T>(acc, M, C, "scale_add");
  for_row_blocks(M, C, [&](int64_t, int64_t m0, int64_t m1) {
    std::vector<A> cb(yc.present() ? C : 0);
    for (int64_t m = m0; m < m1; ++m) {
      T* r = o + m * C;
      if (yc.present()) yc.load(m, C, cb.data());
      for (int64_t c = 0; c < C; ++c) {
        A v = static_cast<A>(r[c]);
        if (zp != nullptr) v *= zp[c];
        if (yc.present()) v += cb[c];
        r[c] = static_cast<T>(v);
      }
    }
  });
}

}  // namespace

#define NODEPRUNE_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void gated_rows(const Source& a, const Source& ac, const std::optional<at::Tensor>& z, const at::Tensor& out,
                int64_t M, int64_t C) {
  NODEPRUNE_DISPATCH(out.scalar_type(), "gated_rows", [&] { gated_rows_impl<scalar_t>(a, ac, z, out, M, C); });
}

void backward_rows(const Source& p, const std::optional<at::Tensor>& z, const Source& e, const Source& ec,
                   int64_t out_kind, const std::optional<at::Tensor>& out1, const std::optional<at::Tensor>& out2,
                   const std::optional<at::Tensor>& part, int64_t M, int64_t C) {
  TORCH_CHECK(std::get<1>(p).has_value(), "backward_rows: p is required");
  NODEPRUNE_DISPATCH(std::get<1>(p)->scalar_type(), "backward_rows", [&] {
    backward_rows_impl<scalar_t>(p, z, e, ec, out_kind, out1, out2, part, M, C);
  });
}

void scale_add(const at::Tensor& acc, const std::optional<at::Tensor>& z, const Source& yc, int64_t M, int64_t C) {
  NODEPRUNE_DISPATCH(acc.scalar_type(), "scale_add", [&] { scale_add_impl<scalar_t>(acc, z, yc, M, C); });
}

}  // namespace nodeprune
