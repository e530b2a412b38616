// mlx-med's CPU kernels for a transformer on MLX's CPU backend: SwiGLU (silu(gate) * up), the
// attention softmax (plain and causal-masked), the row logsumexp, the cross-entropy of class targets,
// RMSNorm and RoPE, each with its gradient. MLX's x86 CPU build has no SIMD type for float
// (simd::max_size == 1), so its exp is a scalar Cephes polynomial with a libm fma per term, and its CPU
// RMSNorm, RoPE and masked attention are graphs of many small ops. These kernels compute the *same*
// arithmetic, op for op and in the same order, as MLX 0.32's ops and the vjps its autodiff builds
// from them: the exp eight lanes at a time with AVX2 + FMA when the CPU has them (checked at run
// time), else the scalar reference loop; cos/sin are MLX's own (simd.h). fma is exact in both, and
// -ffp-contract=off forbids any other fusing, so the results are bit for bit MLX's; sums are added in
// MLX's (index) order. MLX runs its ops on one thread; large inputs are split by rows over the
// process's CPUs here (every row is still computed whole by one thread, so the bits do not change).

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <sched.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"  // MLX's own cos and sin for RoPE's angles
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "primitive_io.h"
#include "worker_pool.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace mlx_med {

// ---- MLX's simd::exp, one float at a time (the reference and the fallback) ----------------------
// Cephes polynomial with the fastermath constants. MLX rounds with floor(double(x) + 0.5);
// floor(x) + (x - floor(x) >= 0.5) is the same integer for every float and stays in float lanes.
// Out-of-range and NaN inputs are zeroed before the int conversion (so it is defined) and get
// MLX's results from the selects: inf above 88, 0 below -88, NaN passed through.
static inline float mlx_exp(float x_init) {
  float xc = (x_init >= -88.0f && x_init <= 88.0f) ? x_init : 0.0f;
  float x = xc * 1.442695f;
  float fl = std::floor(x);
  float ipart = (x - fl >= 0.5f) ? fl + 1.0f : fl + 0.0f;
  float fpart = x - ipart;
  float p = 1.535336188319500e-4f;
  p = std::fma(p, fpart, 1.339887440266574e-3f);
  p = std::fma(p, fpart, 9.618437357674640e-3f);
  p = std::fma(p, fpart, 5.550332471162809e-2f);
  p = std::fma(p, fpart, 2.402264791363012e-1f);
  p = std::fma(p, fpart, 6.931472028550421e-1f);
  p = std::fma(p, fpart, 1.000000000000000f);
  int32_t epart = (static_cast<int32_t>(ipart) + 127) << 23;
  float scale;
  std::memcpy(&scale, &epart, sizeof(scale));
  float result = std::isnan(x_init) ? x_init : scale * p;
  result = x_init > 88.0f ? std::numeric_limits<float>::infinity() : result;
  result = x_init < -88.0f ? 0.0f : result;
  return result;
}

// MLX's Sigmoid: 1 / (1 + exp(|g|)), mirrored for g >= 0.
static inline float mlx_sigmoid(float g) {
  float y = 1.0f / (1.0f + mlx_exp(std::fabs(g)));
  return g < 0.0f ? y : 1.0f - y;
}

// MLX's Sigmoid then two multiplies, as nn.silu(gate) * up evaluates.
static inline float mlx_swiglu(float g, float u) {
  return (g * mlx_sigmoid(g)) * u;
}

// The gradients MLX's autodiff gives for nn.silu(gate) * up (Multiply, Multiply, Sigmoid vjps), one
// product at a time in its order: s = sigmoid(g), d_up = (g * s) * c, da = u * c,
// d_gate = s * da + (g * da) * (s * (1 - s)).
static inline void mlx_swiglu_vjp(float g, float u, float c, float* d_gate, float* d_up) {
  float s = mlx_sigmoid(g);
  float da = u * c;
  *d_up = (g * s) * c;
  *d_gate = s * da + (g * da) * (s * (1.0f - s));
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MLX_MED_AVX2 1
#define AVX2_FMA __attribute__((target("avx2,fma")))
#define AVX512F __attribute__((target("avx512f,avx2,fma")))

// The same steps as mlx_exp, eight lanes at a time.
AVX2_FMA static inline __m256 mlx_exp8(__m256 x_init) {
  const __m256 lo = _mm256_set1_ps(-88.0f), hi = _mm256_set1_ps(88.0f);
  __m256 in_range = _mm256_and_ps(_mm256_cmp_ps(x_init, lo, _CMP_GE_OQ),
                                  _mm256_cmp_ps(x_init, hi, _CMP_LE_OQ));
  __m256 x = _mm256_mul_ps(_mm256_and_ps(x_init, in_range), _mm256_set1_ps(1.442695f));
  __m256 fl = _mm256_floor_ps(x);
  __m256 round_up = _mm256_cmp_ps(_mm256_sub_ps(x, fl), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  __m256 ipart = _mm256_add_ps(fl, _mm256_and_ps(round_up, _mm256_set1_ps(1.0f)));
  __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(1.000000000000000f));
  __m256i epart = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 result = _mm256_mul_ps(_mm256_castsi256_ps(epart), p);
  result = _mm256_blendv_ps(result, x_init, _mm256_cmp_ps(x_init, x_init, _CMP_UNORD_Q));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                            _mm256_cmp_ps(x_init, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x_init, lo, _CMP_LT_OQ));
}

// The same steps as mlx_sigmoid, eight lanes at a time.
AVX2_FMA static inline __m256 mlx_sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, mlx_exp8(_mm256_and_ps(g, abs_mask))));
  __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(one, y), y, negative);
}

AVX2_FMA static void swiglu_avx2(const float* gate, const float* up, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, mlx_sigmoid8(g)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; i++) out[i] = mlx_swiglu(gate[i], up[i]);
}

AVX2_FMA static void swiglu_vjp_avx2(const float* gate, const float* up, const float* cotan,
                                      float* d_gate, float* d_up, size_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256 u = _mm256_loadu_ps(up + i);
    __m256 c = _mm256_loadu_ps(cotan + i);
    __m256 s = mlx_sigmoid8(g);
    __m256 da = _mm256_mul_ps(u, c);
    _mm256_storeu_ps(d_up + i, _mm256_mul_ps(_mm256_mul_ps(g, s), c));
    __m256 sprime = _mm256_mul_ps(s, _mm256_sub_ps(one, s));
    _mm256_storeu_ps(d_gate + i, _mm256_add_ps(_mm256_mul_ps(s, da),
                                               _mm256_mul_ps(_mm256_mul_ps(g, da), sprime)));
  }
  for (; i < n; i++) mlx_swiglu_vjp(gate[i], up[i], cotan[i], d_gate + i, d_up + i);
}

AVX2_FMA static void shifted_exp_avx2(const float* in, float* out, float maximum, size_t n) {
  const __m256 m = _mm256_set1_ps(maximum);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(in + i), m)));
  }
  for (; i < n; i++) out[i] = mlx_exp(in[i] - maximum);
}

// The row maximum as MLX's loop finds it: NaN if any element is NaN, else the largest value (a maximum
// is the same in any order; only the sign of a zero maximum could differ, which no result depends on).
AVX2_FMA static float row_max_avx2(const float* in, size_t n) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(in + i);
    vmax = _mm256_max_ps(vmax, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float maximum = lanes[0];
  for (int l = 1; l < 8; l++) maximum = lanes[l] > maximum ? lanes[l] : maximum;
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; i++) {
    any_nan = any_nan || std::isnan(in[i]);
    maximum = in[i] > maximum ? in[i] : maximum;
  }
  if (any_nan) {  // MLX's loop keeps the last NaN it meets
    for (size_t j = n; j-- > 0;) {
      if (std::isnan(in[j])) return in[j];
    }
  }
  return maximum;
}

// sum of exp(x - maximum), added in index order.
AVX2_FMA static float shifted_exp_sum_avx2(const float* in, float maximum, size_t n) {
  const __m256 m = _mm256_set1_ps(maximum);
  alignas(32) float lanes[8];
  float total = 0.0f;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_store_ps(lanes, mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(in + i), m)));
    for (int l = 0; l < 8; l++) total += lanes[l];
  }
  for (; i < n; i++) total += mlx_exp(in[i] - maximum);
  return total;
}

AVX2_FMA static void scale_avx2(float* out, float factor, size_t n) {
  const __m256 f = _mm256_set1_ps(factor);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), f));
  for (; i < n; i++) out[i] = out[i] * factor;
}

// AVX2 + FMA when the CPU has them, unless MLX_MED_KERNELS=scalar asks for the reference loop.
static bool has_avx2_fma() {
  static const bool yes = [] {
    const char* choice = std::getenv("MLX_MED_KERNELS");
    if (choice && std::string(choice) == "scalar") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

// The decode attention's AVX-512 loops (MLX_MED_KERNELS=avx2 keeps the AVX2 ones, e.g. to test them).
static bool has_avx512f() {
  static const bool yes = [] {
    const char* choice = std::getenv("MLX_MED_KERNELS");
    if (!has_avx2_fma() || (choice && std::string(choice) == "avx2")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}
#endif

static void swiglu_f32(const float* gate, const float* up, float* out, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return swiglu_avx2(gate, up, out, n);
#endif
  for (size_t i = 0; i < n; i++) out[i] = mlx_swiglu(gate[i], up[i]);
}

static void swiglu_vjp_f32(const float* gate, const float* up, const float* cotan, float* d_gate,
                           float* d_up, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return swiglu_vjp_avx2(gate, up, cotan, d_gate, d_up, n);
#endif
  for (size_t i = 0; i < n; i++) mlx_swiglu_vjp(gate[i], up[i], cotan[i], d_gate + i, d_up + i);
}

static const char* isa() {
#ifdef MLX_MED_AVX2
  if (has_avx512f()) return "avx2+fma, avx512f attention";
  if (has_avx2_fma()) return "avx2+fma";
#endif
  return "scalar";
}

static void shifted_exp_f32(const float* in, float* out, float maximum, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return shifted_exp_avx2(in, out, maximum, n);
#endif
  for (size_t i = 0; i < n; i++) out[i] = mlx_exp(in[i] - maximum);
}

static void scale_f32(float* out, float factor, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return scale_avx2(out, factor, n);
#endif
  for (size_t i = 0; i < n; i++) out[i] = out[i] * factor;
}

static float row_max_f32(const float* in, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return row_max_avx2(in, n);
#endif
  float maximum = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; i++) maximum = std::isnan(in[i]) ? in[i] : (in[i] > maximum ? in[i] : maximum);
  return maximum;
}

static float shifted_exp_sum_f32(const float* in, float maximum, size_t n) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return shifted_exp_sum_avx2(in, maximum, n);
#endif
  float total = 0.0f;
  for (size_t i = 0; i < n; i++) total += mlx_exp(in[i] - maximum);
  return total;
}

// MLX's fp32 logsumexp over each row: the maximum, the exponentials' sum in index order, log + max
// (the maximum itself when it is infinite).
static void logsumexp_rows_f32(const float* in, float* out, size_t rows, size_t cols) {
  for (size_t r = 0; r < rows; r++, in += cols) {
    float maximum = row_max_f32(in, cols);
    float normalizer = shifted_exp_sum_f32(in, maximum, cols);
    out[r] = std::isinf(maximum) ? maximum : std::log(normalizer) + maximum;
  }
}

// The sums of `Chains` rows `stride` apart, row j over its first lengths[j] values, each added in index
// order from 0 as MLX's CPU reductions add an fp32 row on x86 (one lane). In one row each add waits for
// the one before; the rows' chains interleaved keep the adder busy, and every row gets the same bits.
template <size_t Chains>
static void interleaved_sums(const float* rows, size_t stride, const size_t* lengths, float* sums) {
  size_t common = *std::min_element(lengths, lengths + Chains);
  float total[Chains] = {};
  for (size_t i = 0; i < common; i++)
    for (size_t j = 0; j < Chains; j++) total[j] += rows[j * stride + i];
  for (size_t j = 0; j < Chains; j++) {
    for (size_t i = common; i < lengths[j]; i++) total[j] += rows[j * stride + i];
    sums[j] = total[j];
  }
}

// interleaved_sums over `count` rows, eight at a time while eight are left.
static void ordered_row_sums(const float* rows, size_t stride, const size_t* lengths, size_t count, float* sums) {
  size_t j = 0;
  for (; j + 8 <= count; j += 8) interleaved_sums<8>(rows + j * stride, stride, lengths + j, sums + j);
  for (; j + 4 <= count; j += 4) interleaved_sums<4>(rows + j * stride, stride, lengths + j, sums + j);
  for (; j < count; j++) interleaved_sums<1>(rows + j * stride, stride, lengths + j, sums + j);
}

constexpr size_t kSoftmaxRows = 32;  // rows whose sums are taken together

// MLX's fp32 softmax of `count` rows `stride` apart, row j over its first lengths[j] values (the rest
// untouched): the maximum (NaN sticks), the exponentials, their sum added in index order (the order MLX
// adds them in, so the same rounding), one reciprocal, one multiply each. `in` may be `out`.
static void softmax_rows_f32(const float* in, float* out, size_t stride, const size_t* lengths, size_t count) {
  float normalizers[kSoftmaxRows];
  for (size_t j0 = 0; j0 < count; j0 += kSoftmaxRows) {
    size_t rows = std::min(kSoftmaxRows, count - j0);
    for (size_t j = j0; j < j0 + rows; j++)
      shifted_exp_f32(in + j * stride, out + j * stride, row_max_f32(in + j * stride, lengths[j]), lengths[j]);
    ordered_row_sums(out + j0 * stride, stride, lengths + j0, rows, normalizers);
    for (size_t j = 0; j < rows; j++) scale_f32(out + (j0 + j) * stride, 1 / normalizers[j], lengths[j0 + j]);
  }
}

// `rows` whole rows of `cols` for the functions above: body(offset of the group's first row, lengths,
// rows in the group), kSoftmaxRows rows at a time.
template <typename Body>
static void in_row_groups(size_t rows, size_t cols, Body body) {
  size_t lengths[kSoftmaxRows];
  std::fill(lengths, lengths + kSoftmaxRows, cols);
  for (size_t r = 0; r < rows; r += kSoftmaxRows) body(r * cols, lengths, std::min(kSoftmaxRows, rows - r));
}

// The same for `rows` whole rows of `cols`.
static void softmax_rows_f32(const float* in, float* out, size_t rows, size_t cols) {
  in_row_groups(rows, cols, [&](size_t at, const size_t* lengths, size_t count) {
    softmax_rows_f32(in + at, out + at, cols, lengths, count);
  });
}

// MLX's Softmax::vjp for fp32 (rows as softmax_rows_f32's): sv = y * c, the row sum of sv in index order,
// then sv - y * sum (separate rounding for each product and difference, as MLX's Multiply/Sum/Subtract).
// `c` may be `d`.
static void softmax_vjp_rows_f32(const float* y, const float* c, float* d, size_t stride, const size_t* lengths,
                                 size_t count) {
  float totals[kSoftmaxRows];
  for (size_t j0 = 0; j0 < count; j0 += kSoftmaxRows) {
    size_t rows = std::min(kSoftmaxRows, count - j0);
    for (size_t j = j0; j < j0 + rows; j++)
      for (size_t i = 0, at = j * stride; i < lengths[j]; i++) d[at + i] = y[at + i] * c[at + i];
    ordered_row_sums(d + j0 * stride, stride, lengths + j0, rows, totals);
    for (size_t j = j0; j < j0 + rows; j++) {
      float total = 0.0f + totals[j - j0];  // MLX adds the accumulated row to the reduction's initial 0
      for (size_t i = 0, at = j * stride; i < lengths[j]; i++) d[at + i] = d[at + i] - y[at + i] * total;
    }
  }
}

static void softmax_vjp_rows_f32(const float* y, const float* c, float* d, size_t rows, size_t cols) {
  in_row_groups(rows, cols, [&](size_t at, const size_t* lengths, size_t count) {
    softmax_vjp_rows_f32(y + at, c + at, d + at, cols, lengths, count);
  });
}

// Zeros in each of `count` rows (`stride` apart) from its end to the stride.
static void zero_past_ends(float* rows, size_t stride, const size_t* ends, size_t count) {
  for (size_t r = 0; r < count; r++) std::fill(rows + r * stride + ends[r], rows + (r + 1) * stride, 0.0f);
}

// The cross-entropy of MLX's nn.losses.cross_entropy for class-index targets (its CPU path), one row
// at a time through a row-sized scratch: shifted = x - max(x); loss = logsumexp(shifted) - shifted[t].
// `target` is normalized as MLX's take_along_axis does (a negative index counts from the end); an
// index still out of range gives NaN (MLX would read outside the row).
static bool target_in_row(int64_t* target, size_t cols) {
  if (*target < 0) *target += static_cast<int64_t>(cols);
  return *target >= 0 && *target < static_cast<int64_t>(cols);
}

static void shift_by_max(const float* x, float* shifted, size_t cols) {
  float maximum = row_max_f32(x, cols);
  for (size_t i = 0; i < cols; i++) shifted[i] = x[i] - maximum;
}

static void cross_entropy_rows_f32(const float* x, const int32_t* targets, float* loss, size_t rows,
                                   size_t cols) {
  std::vector<float> shifted(cols);
  for (size_t r = 0; r < rows; r++, x += cols) {
    int64_t t = targets[r];
    if (!target_in_row(&t, cols)) {
      loss[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    shift_by_max(x, shifted.data(), cols);
    float maximum = row_max_f32(shifted.data(), cols);
    float normalizer = shifted_exp_sum_f32(shifted.data(), maximum, cols);
    float lse = std::isinf(maximum) ? maximum : std::log(normalizer) + maximum;
    loss[r] = lse - shifted[t];
  }
}

// Its gradient as MLX's autodiff builds it: the logsumexp's g * softmax(shifted) plus the gather's
// scatter-add of -g into zeros at the target (so 0 + the product elsewhere), g the row's cotangent.
static void cross_entropy_vjp_rows_f32(const float* x, const int32_t* targets, const float* cotan, float* d,
                                       size_t rows, size_t cols) {
  for (size_t r = 0; r < rows; r++, x += cols, d += cols) {
    int64_t t = targets[r];
    if (!target_in_row(&t, cols)) {
      std::fill(d, d + cols, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    shift_by_max(x, d, cols);
    softmax_rows_f32(d, d, 1, cols);
    float g = cotan[r];
    float at_target = g * d[t];
    for (size_t i = 0; i < cols; i++) d[i] = g * d[i] + 0.0f;
    d[t] = at_target + (0.0f + -g);
  }
}

// What a loop is told of its first input: rows x cols (the last axis), the sizes of the two axes
// before the last (the attention scores' query axis; RoPE's positions and heads), the size of its
// second input, and the primitive's parameters (RoPE: dims, base, scale; RMSNorm: eps).
struct Extent {
  size_t rows, cols, queries, planes, second_size;
  std::array<float, 3> params;
};

// ---- RoPE (non-traditional, base frequencies) as MLX's CPU fallback graph computes it ------------
// positions = (arange(T) + offset) * scale; inv_freq[j] = exp(-j * (log(base) / (dims / 2)));
// theta = position * inv_freq; the first half x1 and the second half x2 of the first `dims` features:
// (x1 cos - x2 sin, x1 sin + x2 cos), the rest copied. cos and sin are MLX's own (simd.h).
// cos and sin of every position a call needs (one offset: T positions; one per batch row: B x T),
// computed once per call as MLX does (it broadcasts them over the heads).
struct RopeAngles {
  size_t half, positions_per_batch;
  bool per_batch;
  std::vector<float> cosines, sines;

  RopeAngles(Extent e, const int32_t* offsets)
      : half(static_cast<size_t>(e.params[0]) / 2), positions_per_batch(e.queries), per_batch(e.second_size != 1) {
    size_t batches = per_batch ? e.rows / (e.queries * e.planes) : 1;
    std::vector<float> inv_freq(half);
    float step = std::log(e.params[1]) / static_cast<float>(half);  // MLX: std::log(base) / half_dims, in float
    // arange(0, -half, -1) starts at +0 (0 - 0, not -0)
    for (size_t j = 0; j < half; j++) inv_freq[j] = mlx_exp((0.0f - static_cast<float>(j)) * step);
    cosines.resize(batches * e.queries * half);
    sines.resize(cosines.size());
    namespace simd = mx::simd;
    for (size_t b = 0; b < batches; b++) {
      float offset = static_cast<float>(offsets[b]);
      for (size_t t = 0; t < e.queries; t++) {
        float position = (static_cast<float>(t) + offset) * e.params[2];  // (arange(T) + offset) * scale
        size_t at = (b * e.queries + t) * half;
        for (size_t j = 0; j < half; j++) {
          float theta = position * inv_freq[j];
          cosines[at + j] = simd::cos(simd::Simd<float, 1>(theta)).value;
          sines[at + j] = simd::sin(simd::Simd<float, 1>(theta)).value;
        }
      }
    }
  }

  // The angles of row r of a (B, N, T, D) input.
  const float* cosines_of(size_t r, Extent e) const { return cosines.data() + row(r, e); }
  const float* sines_of(size_t r, Extent e) const { return sines.data() + row(r, e); }

 private:
  size_t row(size_t r, Extent e) const {
    size_t b = per_batch ? r / (e.queries * e.planes) : 0;
    return (b * positions_per_batch + r % e.queries) * half;
  }
};

// ---- RMSNorm as MLX's CPU fallback graph computes it ------------------------------------------------
// r = 1 / sqrt(sum(x * x) * (1 / D) + eps) with the sum in index order; y = (x * r) * w.
static float mean_factor(size_t cols) {  // MLX's mean: the sum times float(1.0 / D), D counted in double
  return static_cast<float>(1.0 / static_cast<double>(cols));
}

static float rms_factor(const float* x, size_t cols, float eps, float* variance) {
  float total = 0.0f;
  for (size_t i = 0; i < cols; i++) total += x[i] * x[i];
  *variance = (0.0f + total) * mean_factor(cols) + eps;
  return 1.0f / std::sqrt(*variance);
}

// ---- splitting one kernel call over the CPUs -------------------------------------------------------
// The threads a call may use: MLX_MED_KERNEL_THREADS, else the CPUs this process may run on (at most 8).
// Only a whole number >= 1 (spaces around it allowed) counts, as mlx_med.switches reads it for doctor.
size_t kernel_threads() {
  static const size_t threads = [] {
    if (const char* choice = std::getenv("MLX_MED_KERNEL_THREADS")) {
      const char* digits = choice;
      while (std::isspace(static_cast<unsigned char>(*digits))) digits++;
      char* end = nullptr;
      long n = std::isdigit(static_cast<unsigned char>(*digits)) ? std::strtol(digits, &end, 10) : 0;
      while (end && std::isspace(static_cast<unsigned char>(*end))) end++;
      if (n >= 1 && end && *end == '\0') return static_cast<size_t>(std::min<long>(n, 64));
    }
    cpu_set_t set;
    size_t n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    return std::clamp<size_t>(n, 1, 8);
  }();
  return threads;
}

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr size_t kMinElementsPerThread = 1 << 16;

// Run body(first_row, end_row) over [0, rows) in contiguous row ranges, one per thread of the worker
// pool (the calling thread among them). Each row is handled whole by one thread.
template <typename Body>
static void for_row_ranges(size_t rows, size_t cols, Body body) {
  size_t by_size = rows * std::max<size_t>(cols, 1) / kMinElementsPerThread;
  size_t parts = std::min({kernel_threads(), rows, std::max<size_t>(by_size, 1)});
  if (parts <= 1) return body(size_t(0), rows);
  size_t per_part = (rows + parts - 1) / parts;
  worker_pool().run(parts, [&](size_t part) {
    size_t first = part * per_part;
    if (first < rows) body(first, std::min(rows, first + per_part));
  });
}

// Run body(row) for every row of a call, the rows split over threads as for_row_ranges does.
template <typename Body>
static void for_each_row(Extent e, Body body) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    for (size_t r = first; r < end; r++) body(r);
  });
}

static mx::array contiguous(const mx::array& a, mx::Stream s) {
  // A row-contiguous copy MLX makes only when the input is not already one.
  return mx::contiguous(a, false, s);
}

// An MLX primitive running one of the loops above on the CPU: its outputs are allocated here and the
// loop gets the float32 buffers (inputs row-contiguous, see contiguous()). No GPU version: the Python
// side sends only CPU float32 work here.
class CpuKernel : public mx::Primitive {
 public:
  using Loop = void (*)(const std::vector<const float*>& in, const std::vector<float*>& out, Extent extent);
  CpuKernel(mx::Stream stream, const char* name, Loop loop, std::array<float, 3> params = {})
      : mx::Primitive(stream), name_(name), loop_(loop), params_(params) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encode_io(stream(), inputs, outputs);
    std::vector<const float*> in;
    std::vector<float*> out;
    for (auto& a : inputs) in.push_back(static_cast<const float*>(a.data<void>()));
    for (auto& a : outputs) out.push_back(a.data<float>());
    const auto& shape = inputs[0].shape();
    Extent extent;
    extent.cols = shape.empty() ? 1 : shape.back();
    extent.rows = inputs[0].size() / std::max<size_t>(extent.cols, 1);
    extent.queries = shape.size() < 2 ? 1 : shape[shape.size() - 2];
    extent.planes = shape.size() < 3 ? 1 : shape[shape.size() - 3];
    extent.second_size = inputs.size() < 2 ? 0 : inputs[1].size();
    extent.params = params_;
    encoder.dispatch([in, out, extent, loop = loop_]() { loop(in, out, extent); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[mlx_med.") + name_ + "] runs on the CPU only.");
  }
  const char* name() const override { return name_; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return std::string(name_) == other.name() && params_ == static_cast<const CpuKernel&>(other).params_;
  }

 private:
  const char* name_;
  Loop loop_;
  std::array<float, 3> params_;
};

// The loops each primitive runs: its rows split over threads (see for_row_ranges).
using Inputs = std::vector<const float*>;
using Outputs = std::vector<float*>;

static void swiglu_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    size_t at = first * e.cols;
    swiglu_f32(in[0] + at, in[1] + at, out[0] + at, (end - first) * e.cols);
  });
}

static void swiglu_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    size_t at = first * e.cols;
    swiglu_vjp_f32(in[0] + at, in[1] + at, in[2] + at, out[0] + at, out[1] + at, (end - first) * e.cols);
  });
}

static void softmax_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    softmax_rows_f32(in[0] + first * e.cols, out[0] + first * e.cols, end - first, e.cols);
  });
}

static void softmax_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    size_t at = first * e.cols;
    softmax_vjp_rows_f32(in[0] + at, in[1] + at, out[0] + at, end - first, e.cols);
  });
}

// The causal attention softmax: scores (..., queries, keys) with the queries aligned to the last keys
// (query q sees keys k <= q + keys - queries), as MLX's fallback builds it: where(mask, scores,
// finfo.min), then the softmax of the whole row.
static size_t visible_keys(size_t query, size_t queries, size_t keys) {  // keys [0, limit) for this query
  int64_t limit = static_cast<int64_t>(query + keys) - static_cast<int64_t>(queries) + 1;
  return static_cast<size_t>(std::clamp<int64_t>(limit, 0, static_cast<int64_t>(keys)));
}

static size_t causal_limit(size_t row, Extent e) {  // keys [0, limit) are visible from this row
  return visible_keys(row % e.queries, e.queries, e.cols);
}

static void causal_softmax_loop(const Inputs& in, const Outputs& out, Extent e) {
  const float lowest = std::numeric_limits<float>::lowest();
  for_each_row(e, [&](size_t r) {
    const float* x = in[0] + r * e.cols;
    float* y = out[0] + r * e.cols;
    size_t limit = causal_limit(r, e);
    std::copy(x, x + limit, y);
    std::fill(y + limit, y + e.cols, lowest);
    softmax_rows_f32(y, y, 1, e.cols);
  });
}

// Its gradient: the softmax's, then Select's vjp (the float mask times the cotangent: 0 * d hidden).
static void causal_softmax_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_each_row(e, [&](size_t r) {
    size_t at = r * e.cols;
    softmax_vjp_rows_f32(in[0] + at, in[1] + at, out[0] + at, 1, e.cols);
    for (size_t i = causal_limit(r, e); i < e.cols; i++) out[0][at + i] = 0.0f * out[0][at + i];
  });
}

// in[1] holds the int32 targets (cross_entropy() makes them so); the primitive passes every buffer as float*.
static void cross_entropy_loop(const Inputs& in, const Outputs& out, Extent e) {
  auto targets = reinterpret_cast<const int32_t*>(in[1]);
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    cross_entropy_rows_f32(in[0] + first * e.cols, targets + first, out[0] + first, end - first, e.cols);
  });
}

static void cross_entropy_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  auto targets = reinterpret_cast<const int32_t*>(in[1]);
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    cross_entropy_vjp_rows_f32(in[0] + first * e.cols, targets + first, in[2] + first,
                               out[0] + first * e.cols, end - first, e.cols);
  });
}

// in[1]: the int32 offsets; params: dims, base, scale.
static void rope_loop(const Inputs& in, const Outputs& out, Extent e) {
  const RopeAngles angles(e, reinterpret_cast<const int32_t*>(in[1]));
  size_t half = angles.half;
  for_each_row(e, [&](size_t r) {
    const float* cosines = angles.cosines_of(r, e);
    const float* sines = angles.sines_of(r, e);
    const float* x = in[0] + r * e.cols;
    float* y = out[0] + r * e.cols;
    for (size_t j = 0; j < half; j++) {
      float x1 = x[j], x2 = x[j + half], c = cosines[j], s = sines[j];
      y[j] = x1 * c - x2 * s;
      y[j + half] = x1 * s + x2 * c;
    }
    std::copy(x + 2 * half, x + e.cols, y + 2 * half);
  });
}

// Its gradient as MLX's autodiff of that graph builds it: the products' and the difference's vjps,
// each half's cotangent scattered into zeros (slice vjp) and the scattered parts added (so + 0).
static void rope_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  const RopeAngles angles(e, reinterpret_cast<const int32_t*>(in[1]));
  size_t half = angles.half;
  for_each_row(e, [&](size_t r) {
    const float* cosines = angles.cosines_of(r, e);
    const float* sines = angles.sines_of(r, e);
    const float* g = in[0] + r * e.cols;
    float* d = out[0] + r * e.cols;
    for (size_t j = 0; j < half; j++) {
      float g1 = g[j], g2 = g[j + half], c = cosines[j], s = sines[j];
      d[j] = (c * g1 + s * g2) + 0.0f;
      d[j + half] = (s * -g1 + c * g2) + 0.0f;
    }
    for (size_t i = 2 * half; i < e.cols; i++) d[i] = g[i] + 0.0f;
  });
}

// in[1]: the weight (D,); params: eps.
static void rms_norm_loop(const Inputs& in, const Outputs& out, Extent e) {
  const float* w = in[1];
  for_each_row(e, [&](size_t r) {
    const float* x = in[0] + r * e.cols;
    float* y = out[0] + r * e.cols;
    float variance;
    float factor = rms_factor(x, e.cols, e.params[0], &variance);
    for (size_t i = 0; i < e.cols; i++) y[i] = (x[i] * factor) * w[i];
  });
}

// The input's gradient as MLX's autodiff of that graph builds it (Multiply, Sqrt(recip), Add, the mean's
// Multiply and Sum, Square vjps), as its two parts: with dy0 = w * c and the row sum s = sum(x * dy0)
// in index order, through the normalizing product r * dy0 (out[0]) and through the square
// x * (2 * ((1 / D) * ((-0.5 * s) * (r / v)))) (out[1]). MLX adds them to the input's other
// cotangents one at a time, so they are returned apart (see ops.Kernels.rms_norm).
static void rms_norm_vjp_loop(const Inputs& in, const Outputs& out, Extent e) {
  const float* w = in[1];
  for_each_row(e, [&](size_t r) {
    const float* x = in[0] + r * e.cols;
    const float* c = in[2] + r * e.cols;
    float* through_product = out[0] + r * e.cols;
    float* through_square = out[1] + r * e.cols;
    float variance;
    float factor = rms_factor(x, e.cols, e.params[0], &variance);
    float total = 0.0f;
    for (size_t i = 0; i < e.cols; i++) {
      float dy0 = w[i] * c[i];
      through_product[i] = factor * dy0;
      total += x[i] * dy0;
    }
    float d_variance = (-0.5f * (0.0f + total)) * (factor / variance);
    float twice = 2.0f * (mean_factor(e.cols) * d_variance);
    for (size_t i = 0; i < e.cols; i++) through_square[i] = x[i] * twice;
  });
}

static void logsumexp_loop(const Inputs& in, const Outputs& out, Extent e) {
  for_row_ranges(e.rows, e.cols, [&](size_t first, size_t end) {
    logsumexp_rows_f32(in[0] + first * e.cols, out[0] + first, end - first, e.cols);
  });
}

static void require_f32_cpu(const mx::array& a, mx::Stream s, const char* op) {
  if (a.dtype() != mx::float32 || s.device != mx::Device::cpu) {
    throw std::invalid_argument(std::string("[mlx_med.") + op + "] float32 on the CPU only.");
  }
}

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(gate, s, "swiglu");
  require_f32_cpu(up, s, "swiglu");
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("[mlx_med.swiglu] gate and up must have the same shape.");
  }
  auto g = contiguous(gate, s);
  auto u = contiguous(up, s);
  return mx::array(gate.shape(), mx::float32, std::make_shared<CpuKernel>(s, "MlxMedSwiGLU", swiglu_loop),
                   {g, u});
}

std::vector<mx::array> swiglu_vjp(const mx::array& gate, const mx::array& up,
                                  const mx::array& cotan, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  for (auto* a : {&gate, &up, &cotan}) require_f32_cpu(*a, s, "swiglu_vjp");
  if (gate.shape() != up.shape() || gate.shape() != cotan.shape()) {
    throw std::invalid_argument("[mlx_med.swiglu_vjp] gate, up and cotangent must have the same shape.");
  }
  return mx::array::make_arrays({gate.shape(), gate.shape()}, {mx::float32, mx::float32},
                                std::make_shared<CpuKernel>(s, "MlxMedSwiGLUVJP", swiglu_vjp_loop),
                                {contiguous(gate, s), contiguous(up, s), contiguous(cotan, s)});
}

mx::array softmax(const mx::array& x, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(x, s, "softmax");
  auto c = contiguous(x, s);
  return mx::array(x.shape(), mx::float32, std::make_shared<CpuKernel>(s, "MlxMedSoftmax", softmax_loop), {c});
}

mx::array causal_softmax(const mx::array& x, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(x, s, "causal_softmax");
  if (x.ndim() < 2) throw std::invalid_argument("[mlx_med.causal_softmax] needs (..., queries, keys).");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedCausalSoftmax", causal_softmax_loop),
                   {contiguous(x, s)});
}

mx::array causal_softmax_vjp(const mx::array& y, const mx::array& cotan, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(y, s, "causal_softmax_vjp");
  require_f32_cpu(cotan, s, "causal_softmax_vjp");
  if (y.ndim() < 2 || y.shape() != cotan.shape()) {
    throw std::invalid_argument("[mlx_med.causal_softmax_vjp] output and cotangent: the same (..., queries, keys).");
  }
  return mx::array(y.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedCausalSoftmaxVJP", causal_softmax_vjp_loop),
                   {contiguous(y, s), contiguous(cotan, s)});
}

mx::array softmax_vjp(const mx::array& y, const mx::array& cotan, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(y, s, "softmax_vjp");
  require_f32_cpu(cotan, s, "softmax_vjp");
  if (y.shape() != cotan.shape()) {
    throw std::invalid_argument("[mlx_med.softmax_vjp] output and cotangent must have the same shape.");
  }
  return mx::array(y.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedSoftmaxVJP", softmax_vjp_loop),
                   {contiguous(y, s), contiguous(cotan, s)});
}

// Checks shared by the cross-entropy and its gradient: float32 logits (..., V), int32 targets (...).
static void require_logits_targets(const mx::array& logits, const mx::array& targets, mx::Stream s,
                                   const char* op) {
  require_f32_cpu(logits, s, op);
  if (targets.dtype() != mx::int32) {
    throw std::invalid_argument(std::string("[mlx_med.") + op + "] targets must be int32.");
  }
  if (logits.ndim() == 0 || logits.shape().back() == 0 ||
      mx::Shape(logits.shape().begin(), logits.shape().end() - 1) != targets.shape()) {
    throw std::invalid_argument(std::string("[mlx_med.") + op +
                                "] logits must be (..., V) with V > 0 and targets (...).");
  }
}

mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_logits_targets(logits, targets, s, "cross_entropy");
  return mx::array(targets.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedCrossEntropy", cross_entropy_loop),
                   {contiguous(logits, s), contiguous(targets, s)});
}

mx::array cross_entropy_vjp(const mx::array& logits, const mx::array& targets, const mx::array& cotan,
                            mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_logits_targets(logits, targets, s, "cross_entropy_vjp");
  require_f32_cpu(cotan, s, "cross_entropy_vjp");
  if (cotan.shape() != targets.shape()) {
    throw std::invalid_argument("[mlx_med.cross_entropy_vjp] the cotangent must have the targets' shape.");
  }
  return mx::array(logits.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedCrossEntropyVJP", cross_entropy_vjp_loop),
                   {contiguous(logits, s), contiguous(targets, s), contiguous(cotan, s)});
}

static void require_rope(const mx::array& x, const mx::array& offsets, int dims, mx::Stream s, const char* op) {
  require_f32_cpu(x, s, op);
  if (x.ndim() != 4 || dims <= 0 || dims % 2 || dims > x.shape(-1)) {
    throw std::invalid_argument(std::string("[mlx_med.") + op + "] needs (B, N, T, D) and an even dims <= D.");
  }
  if (offsets.dtype() != mx::int32 || offsets.ndim() > 1 || (offsets.size() != 1 && offsets.size() != x.shape(0))) {
    throw std::invalid_argument(std::string("[mlx_med.") + op + "] offset: int32, one or one per batch row.");
  }
}

mx::array rope(const mx::array& x, const mx::array& offsets, int dims, float base, float scale,
               mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_rope(x, offsets, dims, s, "rope");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedRoPE", rope_loop,
                                               std::array<float, 3>{static_cast<float>(dims), base, scale}),
                   {contiguous(x, s), contiguous(offsets, s)});
}

mx::array rope_vjp(const mx::array& cotan, const mx::array& offsets, int dims, float base, float scale,
                   mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_rope(cotan, offsets, dims, s, "rope_vjp");
  return mx::array(cotan.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedRoPEVJP", rope_vjp_loop,
                                               std::array<float, 3>{static_cast<float>(dims), base, scale}),
                   {contiguous(cotan, s), contiguous(offsets, s)});
}

static void require_rms_norm(const mx::array& x, const mx::array& weight, mx::Stream s, const char* op) {
  require_f32_cpu(x, s, op);
  require_f32_cpu(weight, s, op);
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.size() != x.shape(-1)) {
    throw std::invalid_argument(std::string("[mlx_med.") + op + "] needs x (..., D) and a weight (D,).");
  }
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_rms_norm(x, weight, s, "rms_norm");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxMedRMSNorm", rms_norm_loop, std::array<float, 3>{eps, 0, 0}),
                   {contiguous(x, s), contiguous(weight, s)});
}

std::vector<mx::array> rms_norm_vjp(const mx::array& x, const mx::array& weight, const mx::array& cotan,
                                    float eps, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_rms_norm(x, weight, s, "rms_norm_vjp");
  require_f32_cpu(cotan, s, "rms_norm_vjp");
  if (cotan.shape() != x.shape()) {
    throw std::invalid_argument("[mlx_med.rms_norm_vjp] the cotangent must have the input's shape.");
  }
  return mx::array::make_arrays({x.shape(), x.shape()}, {mx::float32, mx::float32},
                                std::make_shared<CpuKernel>(s, "MlxMedRMSNormVJP", rms_norm_vjp_loop,
                                                            std::array<float, 3>{eps, 0, 0}),
                                {contiguous(x, s), contiguous(weight, s), contiguous(cotan, s)});
}

mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require_f32_cpu(x, s, "logsumexp");
  if (x.ndim() == 0 || x.shape().back() == 0) {
    throw std::invalid_argument("[mlx_med.logsumexp] needs a non-empty last axis.");
  }
  auto shape = x.shape();
  shape.back() = 1;
  return mx::array(shape, mx::float32, std::make_shared<CpuKernel>(s, "MlxMedLogSumExp", logsumexp_loop),
                   {contiguous(x, s)});
}

// ---- attention of one query per head over cached keys (a decode step), whole ----------------------
// MLX's CPU scaled_dot_product_attention is a graph: q * scale, scores = q @ k^T, the mask, the
// softmax, weights @ v, each matmul one sgemm call per (batch row, query head) into the BLAS. At a
// decode step that is thousands of calls of a few microseconds' overhead for about one of arithmetic.
// This kernel computes the same graph in one pass per (batch row, KV head), with the same bits, by
// adding each output's products the way the BLAS does (BlasSums). OpenBLAS's level-3 driver, on one
// thread, makes every output one fma chain over the inner dimension in index order, started from
// zero; an inner dimension longer than its GEMM_Q is cut into blocks (next_block below) whose chains
// are added to the output one after the other. Its AVX-512 builds (SKYLAKEX, COOPERLAKE, ...) send
// small products to other kernels instead; of those, only the scores' sums differ from one chain
// (lane_score below). Which rule this machine's BLAS follows is found by trying candidates against MLX
// (attention_sums.calibrate); Python only sends the shapes those trials covered.
struct BlasSums {
  size_t q, unroll;       // the level-3 driver's cut: GEMM_Q (0: one chain over the whole inner dimension)
                          // and GEMM_UNROLL_M
  bool small_scores;      // scores within its small-matrix permit take sgemm_small_kernel_tn's sums
  bool threaded = false;  // the threaded driver's cut (level3_thread.c): between Q and 2Q, half rounded up
  size_t place = 0;       // the weighted values' blocks are placed over this many keys (0: the loop's end)

  bool operator==(const BlasSums&) const = default;
};

static size_t next_block(size_t remaining, BlasSums b) {
  if (b.q == 0 || remaining <= b.q) return remaining;
  if (remaining >= 2 * b.q) return b.q;
  if (b.threaded) return (remaining + 1) / 2;
  return (remaining / 2 + b.unroll - 1) / b.unroll * b.unroll;
}

// The end of the block of keys that starts at s0, in a loop over the keys before `end`: the BLAS cuts
// the call's whole inner dimension (sums.place keys), so a loop stopped early (keys no row of a prefill
// block sees) still adds each chain over the same keys, and the chains it leaves out are exact zeros.
static size_t value_block_end(size_t s0, size_t end, BlasSums b) {
  size_t placed = b.place ? b.place : end;
  return std::min(end, s0 + next_block(placed - s0, b));
}

// OpenBLAS's x86-64 small-matrix permit for scores = q @ k^T of one query row (SKYLAKEX's
// sgemm_small_kernel_permit, its transposed-A case: M = S keys, N = 1 row, K = D): M * N <= 1200,
// K >= 32, M * N * K <= 100^3. MLX sends one sgemm per query head, so N is 1 even under GQA.
static bool small_scored(size_t S, size_t D, BlasSums b) {
  return b.small_scores && S <= 1200 && D >= 32 && S * D <= 1000000;
}

// One score as sgemm_small_kernel_tn (AVX-512) adds it: 16 chains, chain l over features l, l + 16,
// ... (in a last partial block of 16, the lanes past D add +0: a masked load), then a fixed tree. Keys in
// whole groups of four from key 0 are reduced four at a time (REDUCE_4: pairwise in lane order); the
// last S mod 4 keys one at a time (_mm512_reduce_add_ps: halves folded, 16 -> 8 -> 4 -> 2 -> 1).
static float lane_score(const float* q, const float* key, size_t D, bool pairwise) {
  float lanes[16] = {};
  for (size_t d0 = 0; d0 < D; d0 += 16) {
    for (size_t l = 0; l < 16; l++) lanes[l] = d0 + l < D ? std::fma(q[d0 + l], key[d0 + l], lanes[l]) : lanes[l] + 0.0f;
  }
  if (pairwise) {
    for (size_t width = 1; width < 16; width *= 2)
      for (size_t l = 0; l < 16; l += 2 * width) lanes[l] = lanes[l] + lanes[l + width];
    return lanes[0];
  }
  for (size_t half = 8; half >= 1; half /= 2)
    for (size_t l = 0; l < half; l++) lanes[l] = lanes[l] + lanes[l + half];
  return lanes[0];
}

// The keys sgemm_small_kernel_tn reduces four at a time: those in whole groups of four from key 0.
static size_t pairwise_keys(size_t S) { return S & ~size_t{3}; }

struct AttentionArgs {
  const float* q;  // (B, Hq, L, D), row-contiguous
  const float* k;  // (B, Hkv, S, D), the last axis contiguous, the others strided (a cache's view)
  const float* v;
  const void* mask;  // (B, Hq, L, S), row-contiguous: bool (mask_kind 1) or float (2); or none (0)
  float* out;        // (B, Hq, L, D)
  size_t B, Hq, Hkv, L, S, D;
  int64_t k_strides[3], v_strides[3];
  int mask_kind;  // 0 none, 1 bool (where(mask, scores, lowest)), 2 additive, 3 causal (aligned to the last keys)
  float scale;
  BlasSums sums;
};

// scores[r][s] (rows of S) for `rows` scaled query rows against keys [first, end): one chain per score
// over d, cut in blocks; or lane_score's sums (only with end == S: their grouping follows S).
static void attention_scores_f32(const float* qs, size_t rows, const float* k, int64_t k_row, size_t first,
                                 size_t end, size_t S, size_t D, BlasSums sums, float* scores) {
  bool small = small_scored(S, D, sums);
  for (size_t r = 0; r < rows; r++) {
    for (size_t s = first; s < end; s++) {
      const float* key = k + static_cast<int64_t>(s) * k_row;
      if (small) {
        scores[r * S + s] = lane_score(qs + r * D, key, D, s < pairwise_keys(S));
        continue;
      }
      float total = 0.0f;
      for (size_t d0 = 0; d0 < D;) {
        size_t d1 = d0 + next_block(D - d0, sums);
        float chain = 0.0f;
        for (size_t d = d0; d < d1; d++) chain = std::fma(qs[r * D + d], key[d], chain);
        total = total + chain;
        d0 = d1;
      }
      scores[r * S + s] = total;
    }
  }
}

// out[d] = sum over s of w[s] * v[s][d]: one chain per output over s, cut in blocks. Keys before
// `first` carry weight zero (masked out) and are skipped: fma(+0, v, chain) is chain for a finite v, and
// the blocks are still cut from key 0, so every chain adds the same products in the same order.
static void weighted_values_f32(const float* w, const float* v, int64_t v_row, size_t first, size_t S, size_t D,
                                BlasSums sums, float* out) {
  std::fill(out, out + D, 0.0f);
  std::vector<float> chain(D);
  for (size_t s0 = 0; s0 < S;) {
    size_t s1 = value_block_end(s0, S, sums);
    std::fill(chain.begin(), chain.end(), 0.0f);
    for (size_t s = std::max(s0, first); s < s1; s++) {
      const float* value = v + static_cast<int64_t>(s) * v_row;
      for (size_t d = 0; d < D; d++) chain[d] = std::fma(w[s], value[d], chain[d]);
    }
    for (size_t d = 0; d < D; d++) out[d] = out[d] + chain[d];
    s0 = s1;
  }
}

#ifdef MLX_MED_AVX2
// Rows m[0..7] (eight floats each) to columns: t[j] = (m[0][j], ..., m[7][j]).
AVX2_FMA static inline void transpose8(__m256 m[8]) {
  __m256 a0 = _mm256_unpacklo_ps(m[0], m[1]), a1 = _mm256_unpackhi_ps(m[0], m[1]);
  __m256 a2 = _mm256_unpacklo_ps(m[2], m[3]), a3 = _mm256_unpackhi_ps(m[2], m[3]);
  __m256 a4 = _mm256_unpacklo_ps(m[4], m[5]), a5 = _mm256_unpackhi_ps(m[4], m[5]);
  __m256 a6 = _mm256_unpacklo_ps(m[6], m[7]), a7 = _mm256_unpackhi_ps(m[6], m[7]);
  __m256 b0 = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(1, 0, 1, 0)), b1 = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 b2 = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(1, 0, 1, 0)), b3 = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 b4 = _mm256_shuffle_ps(a4, a6, _MM_SHUFFLE(1, 0, 1, 0)), b5 = _mm256_shuffle_ps(a4, a6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 b6 = _mm256_shuffle_ps(a5, a7, _MM_SHUFFLE(1, 0, 1, 0)), b7 = _mm256_shuffle_ps(a5, a7, _MM_SHUFFLE(3, 2, 3, 2));
  m[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
  m[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
  m[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
  m[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
  m[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
  m[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
  m[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
  m[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}

// attention_scores_f32, eight keys per vector: each lane is one key's chain (the chains' order is
// unchanged). The keys of kTiles tiles of eight are first transposed into a small buffer (feature d of
// the tiles' keys in kTiles vectors, L1-resident), then up to kGroupRows query rows (the query heads of
// one KV head) run their chains over it together, each in a register: kGroupRows x kTiles independent
// chains fill the fma latency, and the register file holds them with the rows' broadcast features and
// the key vector. (Transposing inside the loop of chains instead kept 16 tile vectors live beside the
// chains; they spilled to the stack, and the scores took about twice the time of the weighted values.)
constexpr size_t kTiles = 3, kGroupRows = 3;
static_assert(kGroupRows == 3, "attention_scores_avx2 sends the remaining 1 or 2 rows on their own");

// Keys [s, s + keys) (keys <= 8 * kTiles) transposed: packed[(d * kTiles + t) * 8 + l] is feature d of key
// s + 8t + l; the lanes past `keys` hold zeros.
AVX2_FMA static void pack_key_tiles(const float* k, int64_t k_row, size_t s, size_t keys, size_t D, float* packed) {
  for (size_t t = 0; t < kTiles; t++) {
    size_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 tile[8];
      for (size_t l = 0; l < 8; l++) {
        size_t key = 8 * t + l;
        tile[l] = key < keys ? _mm256_loadu_ps(k + static_cast<int64_t>(s + key) * k_row + d) : _mm256_setzero_ps();
      }
      transpose8(tile);
      for (size_t j = 0; j < 8; j++) _mm256_storeu_ps(packed + ((d + j) * kTiles + t) * 8, tile[j]);
    }
    for (; d < D; d++) {
      for (size_t l = 0; l < 8; l++) {
        size_t key = 8 * t + l;
        packed[(d * kTiles + t) * 8 + l] = key < keys ? k[static_cast<int64_t>(s + key) * k_row + d] : 0.0f;
      }
    }
  }
}

// The first `keys` scores of kTiles vectors, eight keys each, to `out`: whole vectors stored directly
// (a copy through memory cost a library call per row and tile group, 4% of a long gradient).
AVX2_FMA static inline void store_keys(const __m256 totals[kTiles], size_t keys, float* out) {
  size_t t = 0;
  for (; 8 * t + 8 <= keys; t++) _mm256_storeu_ps(out + 8 * t, totals[t]);
  if (8 * t == keys) return;
  alignas(32) float last[8];
  _mm256_store_ps(last, totals[t]);
  std::copy(last, last + (keys - 8 * t), out + 8 * t);
}

// Scores of `Rows` scaled query rows (D apart) against the packed keys [s, s + keys): per block of features
// one chain per (row, key) in feature order, added to the row's total (which starts at zero).
template <size_t Rows>
AVX2_FMA static void score_packed(const float* qs, size_t D, BlasSums sums, const float* packed, size_t s,
                                  size_t keys, size_t S, float* scores) {
  __m256 totals[Rows][kTiles];
  for (size_t r = 0; r < Rows; r++)
    for (size_t t = 0; t < kTiles; t++) totals[r][t] = _mm256_setzero_ps();
  for (size_t d0 = 0; d0 < D;) {
    size_t d1 = d0 + next_block(D - d0, sums);
    __m256 chain[Rows][kTiles];
    for (size_t r = 0; r < Rows; r++)
      for (size_t t = 0; t < kTiles; t++) chain[r][t] = _mm256_setzero_ps();
    for (size_t d = d0; d < d1; d++) {
      __m256 feature[Rows];
      for (size_t r = 0; r < Rows; r++) feature[r] = _mm256_set1_ps(qs[r * D + d]);
      for (size_t t = 0; t < kTiles; t++) {
        __m256 key = _mm256_loadu_ps(packed + (d * kTiles + t) * 8);
        for (size_t r = 0; r < Rows; r++) chain[r][t] = _mm256_fmadd_ps(feature[r], key, chain[r][t]);
      }
    }
    for (size_t r = 0; r < Rows; r++)
      for (size_t t = 0; t < kTiles; t++) totals[r][t] = _mm256_add_ps(totals[r][t], chain[r][t]);
    d0 = d1;
  }
  for (size_t r = 0; r < Rows; r++) store_keys(totals[r], keys, scores + r * S + s);
}

// lane_score for one scaled query row against the packed keys [s, s + keys), eight keys per vector,
// every key reduced pairwise; attention_scores_avx2 redoes the last S mod 4 keys (reduced by halves).
// The 16 chains are run eight at a time: the pairwise tree is the sum of the two halves' trees.
AVX2_FMA static void score_packed_lanes(const float* q, size_t D, const float* packed, size_t s, size_t keys,
                                        float* scores) {
  __m256 totals[kTiles];
  for (size_t t = 0; t < kTiles; t++) {
    __m256 halves[2];
    for (size_t h = 0; h < 2; h++) {
      __m256 lane[8];
      for (size_t j = 0; j < 8; j++) lane[j] = _mm256_setzero_ps();
      for (size_t d0 = 0; d0 < D; d0 += 16) {
        for (size_t j = 0; j < 8; j++) {
          size_t d = d0 + 8 * h + j;
          lane[j] = d < D ? _mm256_fmadd_ps(_mm256_set1_ps(q[d]), _mm256_loadu_ps(packed + (d * kTiles + t) * 8), lane[j])
                          : _mm256_add_ps(lane[j], _mm256_setzero_ps());
        }
      }
      for (size_t width = 1; width < 8; width *= 2)
        for (size_t j = 0; j < 8; j += 2 * width) lane[j] = _mm256_add_ps(lane[j], lane[j + width]);
      halves[h] = lane[0];
    }
    totals[t] = _mm256_add_ps(halves[0], halves[1]);
  }
  store_keys(totals, keys, scores + s);
}

// `scratch` holds the packed keys (resized here to D x kTiles x 8 floats).
AVX2_FMA static void attention_scores_avx2(const float* qs, size_t rows, const float* k, int64_t k_row, size_t first,
                                           size_t end, size_t S, size_t D, BlasSums sums, float* scores,
                                           std::vector<float>& scratch) {
  scratch.resize(D * kTiles * 8);
  float* packed = scratch.data();
  bool small = small_scored(S, D, sums);
  for (size_t s = first; s < end; s += 8 * kTiles) {
    size_t keys = std::min(8 * kTiles, end - s);
    pack_key_tiles(k, k_row, s, keys, D, packed);
    size_t r = 0;
    if (small) {
      for (; r < rows; r++) score_packed_lanes(qs + r * D, D, packed, s, keys, scores + r * S);
      continue;
    }
    for (; r + kGroupRows <= rows; r += kGroupRows) score_packed<kGroupRows>(qs + r * D, D, sums, packed, s, keys, S, scores + r * S);
    if (rows - r == 2) score_packed<2>(qs + r * D, D, sums, packed, s, keys, S, scores + r * S);
    if (rows - r == 1) score_packed<1>(qs + r * D, D, sums, packed, s, keys, S, scores + r * S);
  }
  if (!small) return;
  for (size_t r = 0; r < rows; r++)
    for (size_t s = std::max(first, pairwise_keys(S)); s < S; s++)
      scores[r * S + s] = lane_score(qs + r * D, k + static_cast<int64_t>(s) * k_row, D, false);
}

// weighted_values_f32 for several rows of weights over the same values (the query heads of one KV
// head): eight outputs per vector, `Vectors` vectors of `Rows` rows per pass, so that each value row
// loaded serves every row. The counts are constants so that the chains stay in registers (a runtime
// count kept them in memory, and each fma waited on the store of the one before).
template <size_t Rows, size_t Vectors>
AVX2_FMA static inline void weighted_values_pass(const float* w, size_t w_row, const float* v, int64_t v_row,
                                                 size_t first, size_t S, BlasSums sums, float* out,
                                                 size_t out_row) {
  __m256 total[Rows][Vectors], chain[Rows][Vectors];
  for (size_t r = 0; r < Rows; r++)
    for (size_t j = 0; j < Vectors; j++) total[r][j] = _mm256_setzero_ps();
  for (size_t s0 = 0; s0 < S;) {
    size_t s1 = value_block_end(s0, S, sums);
    for (size_t r = 0; r < Rows; r++)
      for (size_t j = 0; j < Vectors; j++) chain[r][j] = _mm256_setzero_ps();
    // keys before `first` carry weight zero and are skipped (why that is exact: weighted_values_f32)
    for (size_t s = std::max(s0, first); s < s1; s++) {
      const float* value = v + static_cast<int64_t>(s) * v_row;
      __m256 values[Vectors];
      for (size_t j = 0; j < Vectors; j++) values[j] = _mm256_loadu_ps(value + 8 * j);
      for (size_t r = 0; r < Rows; r++) {
        __m256 weight = _mm256_set1_ps(w[r * w_row + s]);
        for (size_t j = 0; j < Vectors; j++) chain[r][j] = _mm256_fmadd_ps(weight, values[j], chain[r][j]);
      }
    }
    for (size_t r = 0; r < Rows; r++)
      for (size_t j = 0; j < Vectors; j++) total[r][j] = _mm256_add_ps(total[r][j], chain[r][j]);
    s0 = s1;
  }
  for (size_t r = 0; r < Rows; r++)
    for (size_t j = 0; j < Vectors; j++) _mm256_storeu_ps(out + r * out_row + 8 * j, total[r][j]);
}

// `Rows` rows of weights (w_row apart) over every output (out_row apart).
template <size_t Rows>
AVX2_FMA static void weighted_values_rows(const float* w, size_t w_row, const float* v, int64_t v_row, size_t first,
                                          size_t S, size_t D, BlasSums sums, float* out, size_t out_row) {
  size_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32)
    weighted_values_pass<Rows, 4>(w, w_row, v + d0, v_row, first, S, sums, out + d0, out_row);
  for (; d0 + 8 <= D; d0 += 8)
    weighted_values_pass<Rows, 1>(w, w_row, v + d0, v_row, first, S, sums, out + d0, out_row);
  if (d0 < D) {
    for (size_t r = 0; r < Rows; r++)
      weighted_values_f32(w + r * w_row, v + d0, v_row, first, S, D - d0, sums, out + r * out_row + d0);
  }
}

AVX2_FMA static void weighted_values_avx2(const float* w, size_t w_row, size_t rows, const float* v, int64_t v_row,
                                          size_t first, size_t end, size_t S, size_t D, BlasSums sums, float* out) {
  size_t r = 0;
  for (; r + 3 <= rows; r += 3)
    weighted_values_rows<3>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
  if (rows - r == 2) weighted_values_rows<2>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
  if (rows - r == 1) weighted_values_rows<1>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
}
// The decode attention with 16-float vectors, for CPUs with AVX-512 (whose OpenBLAS builds are the ones
// with small-matrix scores). Same sums as the loops above: the lanes only change how many outputs a
// vector carries, except in the scores, which copy sgemm_small_kernel_tn's own layout.

// sgemm_small_kernel_tn's REDUCE_4: the 16 lanes of each of four keys' accumulators, reduced pairwise
// in lane order (its shuffles and adds, op for op); lane j of the result is key j's score.
AVX512F static inline __m128 reduce_four_keys(const __m512 acc[4]) {
  __m512 r0 = _mm512_unpacklo_ps(acc[0], acc[1]), r1 = _mm512_unpackhi_ps(acc[0], acc[1]);
  __m512 r2 = _mm512_unpacklo_ps(acc[2], acc[3]), r3 = _mm512_unpackhi_ps(acc[2], acc[3]);
  __m512 t0 = _mm512_shuffle_ps(r0, r2, _MM_SHUFFLE(1, 0, 1, 0)), t1 = _mm512_shuffle_ps(r0, r2, _MM_SHUFFLE(3, 2, 3, 2));
  __m512 t2 = _mm512_shuffle_ps(r1, r3, _MM_SHUFFLE(1, 0, 1, 0)), t3 = _mm512_shuffle_ps(r1, r3, _MM_SHUFFLE(3, 2, 3, 2));
  __m512 sum = _mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3));
  __m128 low = _mm_add_ps(_mm512_extractf32x4_ps(sum, 0), _mm512_extractf32x4_ps(sum, 1));
  __m128 high = _mm_add_ps(_mm512_extractf32x4_ps(sum, 2), _mm512_extractf32x4_ps(sum, 3));
  return _mm_add_ps(low, high);
}

// The lanes a 16-float block of `left` remaining features loads: all of them, or the first `left`
// (the rest read as zeros, as the library loads a partial last block).
static inline __mmask16 first_lanes(size_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// Small-matrix scores of `Rows` scaled query rows (D apart) for the keys in whole groups of four from
// the group holding `first` up to `grouped`: per key one 16-lane accumulator over the features (a partial
// last block masked to zeros, as the library loads it), each group's keys loaded once for every row.
template <size_t Rows>
AVX512F static void small_scores_rows(const float* qs, size_t D, const float* k, int64_t k_row, size_t first,
                                      size_t grouped, size_t S, float* scores) {
  for (size_t s = first & ~size_t{3}; s < grouped; s += 4) {
    __m512 acc[Rows][4];
    for (size_t r = 0; r < Rows; r++)
      for (size_t j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (size_t d0 = 0; d0 < D; d0 += 16) {
      __mmask16 mask = first_lanes(D - d0);
      __m512 key[4];
      for (size_t j = 0; j < 4; j++) key[j] = _mm512_maskz_loadu_ps(mask, k + static_cast<int64_t>(s + j) * k_row + d0);
      for (size_t r = 0; r < Rows; r++) {
        __m512 query = _mm512_maskz_loadu_ps(mask, qs + r * D + d0);
        for (size_t j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(key[j], query, acc[r][j]);
      }
    }
    for (size_t r = 0; r < Rows; r++) _mm_storeu_ps(scores + r * S + s, reduce_four_keys(acc[r]));
  }
}

// lane_score(q, key, D, false) with one 16-float vector: a partial last block masked to zeros adds +0
// in its lanes as the scalar lanes do, and the halves fold 16 -> 8 -> 4 -> 2 -> 1 in lane_score's order
// (_mm512_reduce_add_ps's). The scalar version's libm fmaf calls took ~1% of a decode step's samples.
AVX512F static float lane_score_avx512(const float* q, const float* key, size_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (size_t d0 = 0; d0 < D; d0 += 16) {
    __mmask16 mask = first_lanes(D - d0);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + d0), _mm512_maskz_loadu_ps(mask, key + d0), acc);
  }
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(acc), high);
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// Scores within the small-matrix permit (small_scored): keys in whole groups of four as above (a group
// reaching before `first` writes scores the caller overwrites), the last S mod 4 by lane_score_avx512.
AVX512F static void small_scores_avx512(const float* qs, size_t rows, const float* k, int64_t k_row, size_t first,
                                        size_t S, size_t D, float* scores) {
  size_t grouped = pairwise_keys(S), r = 0;
  for (; r + 3 <= rows; r += 3) small_scores_rows<3>(qs + r * D, D, k, k_row, first, grouped, S, scores + r * S);
  if (rows - r == 2) small_scores_rows<2>(qs + r * D, D, k, k_row, first, grouped, S, scores + r * S);
  if (rows - r == 1) small_scores_rows<1>(qs + r * D, D, k, k_row, first, grouped, S, scores + r * S);
  for (size_t row = 0; row < rows; row++)
    for (size_t s = std::max(first, grouped); s < S; s++)
      scores[row * S + s] = lane_score_avx512(qs + row * D, k + static_cast<int64_t>(s) * k_row, D);
}

// weighted_values_pass with 16 outputs per vector.
template <size_t Rows, size_t Vectors>
AVX512F static inline void weighted_values_pass16(const float* w, size_t w_row, const float* v, int64_t v_row,
                                                  size_t first, size_t S, BlasSums sums, float* out, size_t out_row) {
  __m512 total[Rows][Vectors], chain[Rows][Vectors];
  for (size_t r = 0; r < Rows; r++)
    for (size_t j = 0; j < Vectors; j++) total[r][j] = _mm512_setzero_ps();
  for (size_t s0 = 0; s0 < S;) {
    size_t s1 = value_block_end(s0, S, sums);
    for (size_t r = 0; r < Rows; r++)
      for (size_t j = 0; j < Vectors; j++) chain[r][j] = _mm512_setzero_ps();
    for (size_t s = std::max(s0, first); s < s1; s++) {
      const float* value = v + static_cast<int64_t>(s) * v_row;
      __m512 values[Vectors];
      for (size_t j = 0; j < Vectors; j++) values[j] = _mm512_loadu_ps(value + 16 * j);
      for (size_t r = 0; r < Rows; r++) {
        __m512 weight = _mm512_set1_ps(w[r * w_row + s]);
        for (size_t j = 0; j < Vectors; j++) chain[r][j] = _mm512_fmadd_ps(weight, values[j], chain[r][j]);
      }
    }
    for (size_t r = 0; r < Rows; r++)
      for (size_t j = 0; j < Vectors; j++) total[r][j] = _mm512_add_ps(total[r][j], chain[r][j]);
    s0 = s1;
  }
  for (size_t r = 0; r < Rows; r++)
    for (size_t j = 0; j < Vectors; j++) _mm512_storeu_ps(out + r * out_row + 16 * j, total[r][j]);
}

template <size_t Rows>
AVX512F static void weighted_values_rows16(const float* w, size_t w_row, const float* v, int64_t v_row, size_t first,
                                           size_t S, size_t D, BlasSums sums, float* out, size_t out_row) {
  size_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64)
    weighted_values_pass16<Rows, 4>(w, w_row, v + d0, v_row, first, S, sums, out + d0, out_row);
  for (; d0 + 16 <= D; d0 += 16)
    weighted_values_pass16<Rows, 1>(w, w_row, v + d0, v_row, first, S, sums, out + d0, out_row);
  if (d0 < D) {
    for (size_t r = 0; r < Rows; r++)
      weighted_values_f32(w + r * w_row, v + d0, v_row, first, S, D - d0, sums, out + r * out_row + d0);
  }
}

AVX512F static void weighted_values_avx512(const float* w, size_t w_row, size_t rows, const float* v, int64_t v_row,
                                           size_t first, size_t end, size_t S, size_t D, BlasSums sums, float* out) {
  size_t r = 0;
  for (; r + 3 <= rows; r += 3)
    weighted_values_rows16<3>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
  if (rows - r == 2) weighted_values_rows16<2>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
  if (rows - r == 1) weighted_values_rows16<1>(w + r * w_row, w_row, v, v_row, first, end, D, sums, out + r * D, D);
}
#endif

// Scores of keys [first, end) (rows S apart); the others are left unwritten. `end` < S only for sums
// outside the small-matrix scores (whose grouping of keys follows S). `scratch`: the vector path's
// packed keys.
static void attention_scores(const float* qs, size_t rows, const float* k, int64_t k_row, size_t first, size_t end,
                             size_t S, size_t D, BlasSums sums, float* scores, std::vector<float>& scratch) {
#ifdef MLX_MED_AVX2
  if (has_avx512f() && small_scored(S, D, sums)) return small_scores_avx512(qs, rows, k, k_row, first, S, D, scores);
  if (has_avx2_fma()) return attention_scores_avx2(qs, rows, k, k_row, first, end, S, D, sums, scores, scratch);
#else
  (void)scratch;
#endif
  attention_scores_f32(qs, rows, k, k_row, first, end, S, D, sums, scores);
}

// Each of `rows` rows of weights (w_row apart) over the values, into rows of D outputs; the weights of keys
// before `first`, and from `end` on, are zero (masked out) and those keys are not read. `end` < S only
// for uncut sums (a cut's blocks are placed by S).
static void weighted_values(const float* w, size_t w_row, size_t rows, const float* v, int64_t v_row, size_t first,
                            size_t end, size_t S, size_t D, BlasSums sums, float* out) {
  sums.place = S;  // blocks over the whole call's keys, wherever the loops stop (value_block_end)
#ifdef MLX_MED_AVX2
  if (has_avx512f()) return weighted_values_avx512(w, w_row, rows, v, v_row, first, end, S, D, sums, out);
  if (has_avx2_fma()) return weighted_values_avx2(w, w_row, rows, v, v_row, first, end, S, D, sums, out);
#endif
  for (size_t r = 0; r < rows; r++) weighted_values_f32(w + r * w_row, v, v_row, first, end, D, sums, out + r * D);
}

// The keys every one of `rows` rows (S apart) masks out before its first visible one: a batch KV cache's
// left padding. None when a row sees no key at all (its softmax spreads over the masked keys).
static size_t masked_prefix(const bool* keep, size_t rows, size_t S) {
  size_t prefix = S;
  for (size_t r = 0; r < rows; r++) {
    const bool* row = keep + r * S;
    size_t s = 0;
    while (s < S && !row[s]) s++;
    if (s == S) return 0;
    prefix = std::min(prefix, s);
  }
  return prefix;
}

// The keys [0, end) row r (of the rows in (Hq, L) order from `first`) may see: past it the mask hides
// every key, so its weights there are exact zeros (a prefill's causal mask). S when the row sees no key
// at all (its softmax spreads over every key) or the mask does not say.
static size_t visible_end(const AttentionArgs& a, size_t first, size_t r) {
  size_t end = a.S;
  if (a.mask_kind == 3) {
    end = visible_keys(r % a.L, a.L, a.S);
  } else if (a.mask_kind == 1) {
    const bool* keep = static_cast<const bool*>(a.mask) + (first + r) * a.S;
    // eight flags at a time past the causal diagonal (a bool is one byte, 0 or 1)
    for (uint64_t word; end >= 8 && (std::memcpy(&word, keep + end - 8, 8), word == 0);) end -= 8;
    while (end > 0 && !keep[end - 1]) end--;
  }
  return end == 0 ? a.S : end;
}

// Rows of a prefill scored and weighed together, each block only over the keys its rows may see
// (visible_end): about half the work of a causal prefill.
constexpr size_t kPrefillRows = 24;

// The query heads of KV head h of batch row b (GQA: Hq / Hkv of them, each with L queries), whole.
static void attend_one_kv_head(const AttentionArgs& a, size_t b, size_t h, std::vector<float>& qs,
                               std::vector<float>& packed_keys, std::vector<float>& scores) {
  const float lowest = std::numeric_limits<float>::lowest();
  size_t repeats = a.Hq / a.Hkv, rows = repeats * a.L;
  size_t first = (b * a.Hq + h * repeats) * a.L;  // the first of these rows in (B, Hq, L) order
  qs.resize(rows * a.D);
  scores.resize(rows * a.S);
  const float* q = a.q + first * a.D;
  for (size_t i = 0; i < rows * a.D; i++) qs[i] = a.scale * q[i];  // MLX: array(scale) * queries
  const float* k = a.k + static_cast<int64_t>(b) * a.k_strides[0] + static_cast<int64_t>(h) * a.k_strides[1];
  const float* v = a.v + static_cast<int64_t>(b) * a.v_strides[0] + static_cast<int64_t>(h) * a.v_strides[1];
  // Keys masked out for all these rows (left padding) are neither scored nor weighed: their weights are
  // exactly zero, so the visible keys' scores, the softmax and every chain of the output keep MLX's bits
  // (weighted_values_f32), and the padding's share of the cache is not read. In a prefill the keys past
  // what a row may see are skipped the same way: the softmax's sum adds its terms in index order, so the
  // zeros after a row's last visible key add nothing, and a block of rows is scored and weighed only over
  // the keys one of them sees (a cut's blocks stay placed over all S keys: value_block_end). The
  // small-matrix scores' groups are placed by S, so a call that takes them reads every key.
  size_t skip = a.mask_kind == 1 ? masked_prefix(static_cast<const bool*>(a.mask) + first * a.S, rows, a.S) : 0;
  bool by_blocks = a.L > 1 && !small_scored(a.S, a.D, a.sums);
  size_t block = by_blocks ? kPrefillRows : rows;
  size_t ends[kPrefillRows];
  for (size_t r0 = 0; r0 < rows; r0 += block) {
    size_t r1 = std::min(rows, r0 + block), end = a.S;
    if (by_blocks) {  // the last key one of the block's rows sees
      end = skip;
      for (size_t r = r0; r < r1; r++) end = std::max(end, ends[r - r0] = visible_end(a, first, r));
    }
    attention_scores(qs.data() + r0 * a.D, r1 - r0, k, a.k_strides[2], skip, end, a.S, a.D, a.sums,
                     scores.data() + r0 * a.S, packed_keys);
    for (size_t r = r0; r < r1; r++) {
      float* row = scores.data() + r * a.S;
      size_t at = (first + r) * a.S;
      std::fill(row + end, row + a.S, lowest);  // not scored: masked out for every row of the block
      if (a.mask_kind == 1) {
        const bool* keep = static_cast<const bool*>(a.mask) + at;
        std::fill(row, row + skip, lowest);
        for (size_t s = skip; s < end; s++) row[s] = keep[s] ? row[s] : lowest;
      } else if (a.mask_kind == 2) {
        const float* add = static_cast<const float*>(a.mask) + at;
        for (size_t s = 0; s < a.S; s++) row[s] = row[s] + add[s];
      } else if (a.mask_kind == 3) {
        std::fill(row + visible_keys(r % a.L, a.L, a.S), row + a.S, lowest);
      }
    }
    float* block_scores = scores.data() + r0 * a.S;
    if (by_blocks) {
      softmax_rows_f32(block_scores, block_scores, a.S, ends, r1 - r0);
      zero_past_ends(block_scores, a.S, ends, r1 - r0);  // exp(lowest - max) of every key a row does not see
    } else {
      softmax_rows_f32(block_scores, block_scores, r1 - r0, a.S);
    }
    weighted_values(block_scores, a.S, r1 - r0, v, a.v_strides[2], skip, end, a.S, a.D, a.sums,
                    a.out + (first + r0) * a.D);
  }
}

static void attention_loop(const AttentionArgs& a) {
  size_t tasks = a.B * a.Hkv;
  size_t work = (a.Hq / a.Hkv) * a.L * a.S * a.D / 8;  // per task, in the units for_row_ranges splits by
  for_row_ranges(tasks, work, [&](size_t first, size_t end) {
    std::vector<float> qs, packed_keys, scores;
    for (size_t t = first; t < end; t++) attend_one_kv_head(a, t / a.Hkv, t % a.Hkv, qs, packed_keys, scores);
  });
}

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale, int mask_kind, BlasSums sums)
      : mx::Primitive(stream), scale_(scale), mask_kind_(mask_kind), sums_(sums) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encode_io(stream(), inputs, outputs);
    auto& out = outputs[0];
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    AttentionArgs a{q.data<float>(), k.data<float>(), v.data<float>(),
                    inputs.size() > 3 ? inputs[3].data<void>() : nullptr, out.data<float>(),
                    static_cast<size_t>(q.shape(0)), static_cast<size_t>(q.shape(1)),
                    static_cast<size_t>(k.shape(1)), static_cast<size_t>(q.shape(2)),
                    static_cast<size_t>(k.shape(2)), static_cast<size_t>(q.shape(3)),
                    {k.strides()[0], k.strides()[1], k.strides()[2]},
                    {v.strides()[0], v.strides()[1], v.strides()[2]}, mask_kind_, scale_, sums_};
    encoder.dispatch([a]() { attention_loop(a); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[mlx_med.decode_attention] runs on the CPU only.");
  }
  const char* name() const override { return "MlxMedDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return std::string(name()) == other.name() && scale_ == o.scale_ && mask_kind_ == o.mask_kind_ &&
           sums_ == o.sums_;
  }

 private:
  float scale_;
  int mask_kind_;
  BlasSums sums_;
};

// K or V as the kernel reads it: the last axis contiguous (a cache's slice already is; else a copy).
static mx::array rows_contiguous(const mx::array& a, mx::Stream s) {
  return a.strides().back() == 1 ? a : mx::contiguous(a, false, s);
}

mx::array decode_attention(const mx::array& queries, const mx::array& keys, const mx::array& values,
                           std::optional<mx::array> mask, int mask_kind, float scale, int block, int unroll,
                           bool small_scores, bool threaded, mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  for (auto* a : {&queries, &keys, &values}) require_f32_cpu(*a, s, "decode_attention");
  if (queries.ndim() != 4 || keys.ndim() != 4 || keys.shape() != values.shape() ||
      queries.shape(0) != keys.shape(0) || queries.shape(3) != keys.shape(3) || keys.shape(1) == 0 ||
      queries.shape(1) % keys.shape(1) != 0 || keys.shape(2) == 0 || block < 0 || unroll < 1) {
    throw std::invalid_argument(
        "[mlx_med.decode_attention] needs queries (B, Hq, L, D), keys and values (B, Hkv, S, D) with "
        "Hkv dividing Hq, S > 0, a block >= 0 and an unroll >= 1.");
  }
  std::vector<mx::array> inputs = {contiguous(queries, s), rows_contiguous(keys, s), rows_contiguous(values, s)};
  if (mask_kind == 1 || mask_kind == 2) {
    if (!mask) throw std::invalid_argument("[mlx_med.decode_attention] this mask kind needs a mask.");
    mx::Shape shape = {queries.shape(0), queries.shape(1), queries.shape(2), keys.shape(2)};
    auto dtype = mask_kind == 1 ? mx::bool_ : mx::float32;
    if (mask->dtype() != dtype) throw std::invalid_argument("[mlx_med.decode_attention] mask of the wrong dtype.");
    inputs.push_back(contiguous(mx::broadcast_to(*mask, shape, s), s));
  } else if (mask_kind != 0 && mask_kind != 3) {
    throw std::invalid_argument("[mlx_med.decode_attention] mask kind: 0 none, 1 bool, 2 additive, 3 causal.");
  }
  return mx::array(queries.shape(), mx::float32,
                   std::make_shared<DecodeAttention>(
                       s, scale, mask_kind,
                       BlasSums{static_cast<size_t>(block), static_cast<size_t>(unroll), small_scores, threaded}),
                   std::move(inputs));
}

// ---- the gradient of a causal attention in training (no KV cache), whole ----------------------------
// MLX's autodiff of its CPU attention graph (qs = scale * q, scores = qs @ k^T, the causal softmax P,
// out = P @ v; GQA through keys and values broadcast over the query heads) runs, per (batch row, query
// head), four more sgemm calls of a few microseconds each into the BLAS: dP = dout @ v^T, dv = P^T @ dout,
// dqs = dS @ k and dk = (qs^T @ dS)^T, dS being the causal softmax's gradient; then dq = dqs * scale, and
// dk and dv summed over a KV head's query heads in head order ((0 + h0) + h1) + ...). This kernel
// computes the same in one pass per (batch row, KV head), with P recomputed as the fused forward computes
// it (the same bits as the graph's), and each output's products added as OpenBLAS's level-3 driver adds
// them (BlasSums, as in the forward): one fma chain from zero over the inner dimension (the head size; the
// keys; the queries) while it stays within its GEMM_Q, past that chains over the driver's blocks added one
// after the other (a call's dimensions are all the same size in training, where L == S, so one rule cuts
// every product). Python sends only shapes whose gradients were checked against MLX's autodiff on this
// machine (attention_sums.calibrate_training). Products with an exact zero weight (the
// masked half) are skipped: for a finite x, fma(+-0, x, chain) is the chain (but for the sign of a zero),
// and the chains are still added in index order.
struct AttentionVjpArgs {
  const float* q;      // (B, Hq, L, D), row-contiguous
  const float* k;      // (B, Hkv, S, D), the last axis contiguous
  const float* v;
  const float* dout;   // (B, Hq, L, D), row-contiguous: the output's cotangent
  float *dq, *dk, *dv;  // row-contiguous, q's shape and k's
  size_t B, Hq, Hkv, L, S, D;
  int64_t k_strides[3], v_strides[3];
  float scale;
  BlasSums sums;
};

struct AttentionVjpScratch {
  std::vector<float> qs, weights, grads, transposed, partial, packed_keys;
};

// rows x cols of `in` (cols apart) into cols x rows (`out_row` apart), in tiles of 4 x 4: at 1024 keys
// the rows lie 4 KiB apart, and a larger tile's lines fall into the same L1 sets (16 x 16 took the
// gradient of a 1024-key block 113 ms, 4 x 4 88 ms, and less at every length; with the output's rows
// spread too, spread_row, 65 ms, as at 1016 keys).
static void transpose_rows_f32(const float* in, size_t rows, size_t cols, float* out, size_t out_row) {
  for (size_t r0 = 0; r0 < rows; r0 += 4)
    for (size_t c0 = 0; c0 < cols; c0 += 4)
      for (size_t r = r0; r < std::min(rows, r0 + 4); r++)
        for (size_t c = c0; c < std::min(cols, c0 + 4); c++) out[c * out_row + r] = in[r * cols + c];
}

#ifdef MLX_MED_AVX2
// The same in 8 x 8 tiles transposed in registers (the element copies were a sixth of the gradient's
// time); the rows and columns past the last whole tile element by element.
AVX2_FMA static void transpose_rows_avx2(const float* in, size_t rows, size_t cols, float* out, size_t out_row) {
  size_t whole_rows = rows / 8 * 8, whole_cols = cols / 8 * 8;
  for (size_t r0 = 0; r0 < whole_rows; r0 += 8)
    for (size_t c0 = 0; c0 < whole_cols; c0 += 8) {
      __m256 tile[8];
      for (size_t i = 0; i < 8; i++) tile[i] = _mm256_loadu_ps(in + (r0 + i) * cols + c0);
      transpose8(tile);
      for (size_t j = 0; j < 8; j++) _mm256_storeu_ps(out + (c0 + j) * out_row + r0, tile[j]);
    }
  for (size_t r = 0; r < rows; r++)
    for (size_t c = r < whole_rows ? whole_cols : 0; c < cols; c++) out[c * out_row + r] = in[r * cols + c];
}
#endif

static void transpose_rows(const float* in, size_t rows, size_t cols, float* out, size_t out_row) {
#ifdef MLX_MED_AVX2
  if (has_avx2_fma()) return transpose_rows_avx2(in, rows, cols, out, out_row);
#endif
  transpose_rows_f32(in, rows, cols, out, out_row);
}

// The distance between a transposed buffer's rows of `length` floats: one cache line more where they
// would lie a multiple of 4 KiB apart (then every row maps to the same L1 sets).
static size_t spread_row(size_t length) { return length % 1024 == 0 ? length + 16 : length; }

// Per block of output keys, sum over queries of weights^T (S x L, the queries a key is visible to
// from the first) times `values` (L x D): the chains over queries, into `out` (S x D).
static void over_queries(const AttentionVjpArgs& a, const float* transposed, size_t t_row, const float* values,
                         float* out) {
  size_t hidden = a.S - a.L;  // keys before the first query's own: visible to every query
  for (size_t s0 = 0; s0 < a.S; s0 += kPrefillRows) {
    size_t s1 = std::min(a.S, s0 + kPrefillRows);
    size_t first = s0 > hidden ? s0 - hidden : 0;  // the first query that sees key s0 (earlier ones: weight 0)
    weighted_values(transposed + s0 * t_row, t_row, s1 - s0, values, static_cast<int64_t>(a.D), first, a.L, a.L, a.D,
                    a.sums, out + s0 * a.D);
  }
}

static void attention_vjp_one_kv_head(const AttentionVjpArgs& a, size_t b, size_t h, AttentionVjpScratch& t) {
  size_t repeats = a.Hq / a.Hkv, rows = repeats * a.L, D = a.D, S = a.S, L = a.L;
  size_t first = (b * a.Hq + h * repeats) * L;  // the first of these rows in (B, Hq, L) order
  t.qs.resize(rows * D);
  t.weights.resize(rows * S);
  t.grads.resize(rows * S);
  const float* q = a.q + first * D;
  for (size_t i = 0; i < rows * D; i++) t.qs[i] = a.scale * q[i];  // MLX: array(scale) * queries
  const float* dout = a.dout + first * D;
  const float* k = a.k + static_cast<int64_t>(b) * a.k_strides[0] + static_cast<int64_t>(h) * a.k_strides[1];
  const float* v = a.v + static_cast<int64_t>(b) * a.v_strides[0] + static_cast<int64_t>(h) * a.v_strides[1];
  // P as the fused forward computes it, dS = the causal softmax's gradient of dP = dout @ v^T, and
  // dq = (dS @ k) * scale, each block of rows only over the keys one of them sees
  float* dq = a.dq + first * D;
  for (size_t r0 = 0; r0 < rows; r0 += kPrefillRows) {
    size_t r1 = std::min(rows, r0 + kPrefillRows), end = 0;
    for (size_t r = r0; r < r1; r++) end = std::max(end, visible_keys(r % L, L, S));
    attention_scores(t.qs.data() + r0 * D, r1 - r0, k, a.k_strides[2], 0, end, S, D, a.sums,
                     t.weights.data() + r0 * S, t.packed_keys);
    attention_scores(dout + r0 * D, r1 - r0, v, a.v_strides[2], 0, end, S, D, a.sums, t.grads.data() + r0 * S,
                     t.packed_keys);
    size_t row_ends[kPrefillRows];
    for (size_t r = r0; r < r1; r++) row_ends[r - r0] = visible_keys(r % L, L, S);
    float *p = t.weights.data() + r0 * S, *g = t.grads.data() + r0 * S;
    softmax_rows_f32(p, p, S, row_ends, r1 - r0);
    softmax_vjp_rows_f32(p, g, g, S, row_ends, r1 - r0);
    zero_past_ends(p, S, row_ends, r1 - r0);  // exp(lowest - max) of every key a row does not see
    zero_past_ends(g, S, row_ends, r1 - r0);  // Select's vjp: 0 * d where masked
    weighted_values(t.grads.data() + r0 * S, S, r1 - r0, k, a.k_strides[2], 0, end, S, D, a.sums, dq + r0 * D);
    scale_f32(dq + r0 * D, a.scale, (r1 - r0) * D);
  }
  // dk = sum over the query heads of dS^T @ qs, dv = sum of P^T @ dout, in head order
  size_t kv = (b * a.Hkv + h) * S * D;
  size_t t_row = spread_row(L);
  t.transposed.resize(S * t_row);
  t.partial.resize(S * D);
  for (size_t r = 0; r < repeats; r++) {
    using Part = std::tuple<const float*, const float*, float*>;  // weights (L x S), values (L x D), output
    for (auto [weights, values, out] : {Part{t.grads.data(), t.qs.data(), a.dk + kv},
                                        Part{t.weights.data(), dout, a.dv + kv}}) {
      transpose_rows(weights + r * L * S, L, S, t.transposed.data(), t_row);
      float* target = r == 0 ? out : t.partial.data();
      over_queries(a, t.transposed.data(), t_row, values + r * L * D, target);
      if (r > 0)
        for (size_t i = 0; i < S * D; i++) out[i] = out[i] + t.partial[i];
    }
  }
}

static void attention_vjp_loop(const AttentionVjpArgs& a) {
  size_t tasks = a.B * a.Hkv;
  size_t work = (a.Hq / a.Hkv) * a.L * a.S * a.D / 8;  // per task, in the units for_row_ranges splits by
  for_row_ranges(tasks, work, [&](size_t first, size_t end) {
    AttentionVjpScratch scratch;
    for (size_t t = first; t < end; t++) attention_vjp_one_kv_head(a, t / a.Hkv, t % a.Hkv, scratch);
  });
}

class AttentionVJP : public mx::Primitive {
 public:
  AttentionVJP(mx::Stream stream, float scale, BlasSums sums) : mx::Primitive(stream), scale_(scale), sums_(sums) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encode_io(stream(), inputs, outputs);
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2], &dout = inputs[3];
    AttentionVjpArgs a{q.data<float>(), k.data<float>(), v.data<float>(), dout.data<float>(),
                       outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>(),
                       static_cast<size_t>(q.shape(0)), static_cast<size_t>(q.shape(1)),
                       static_cast<size_t>(k.shape(1)), static_cast<size_t>(q.shape(2)),
                       static_cast<size_t>(k.shape(2)), static_cast<size_t>(q.shape(3)),
                       {k.strides()[0], k.strides()[1], k.strides()[2]},
                       {v.strides()[0], v.strides()[1], v.strides()[2]}, scale_, sums_};
    encoder.dispatch([a]() { attention_vjp_loop(a); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[mlx_med.attention_vjp] runs on the CPU only.");
  }
  const char* name() const override { return "MlxMedAttentionVJP"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    if (std::string(name()) != other.name()) return false;
    auto& o = static_cast<const AttentionVJP&>(other);
    return scale_ == o.scale_ && sums_ == o.sums_;
  }

 private:
  float scale_;
  BlasSums sums_;
};

std::vector<mx::array> attention_vjp(const mx::array& queries, const mx::array& keys, const mx::array& values,
                                     const mx::array& cotan, float scale, int block, int unroll, bool threaded,
                                     mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  for (auto* a : {&queries, &keys, &values, &cotan}) require_f32_cpu(*a, s, "attention_vjp");
  if (queries.ndim() != 4 || keys.ndim() != 4 || keys.shape() != values.shape() || cotan.shape() != queries.shape() ||
      queries.shape(0) != keys.shape(0) || queries.shape(3) != keys.shape(3) || keys.shape(1) == 0 ||
      queries.shape(1) % keys.shape(1) != 0 || queries.shape(2) == 0 || keys.shape(2) < queries.shape(2) ||
      block < 0 || unroll < 1) {
    throw std::invalid_argument(
        "[mlx_med.attention_vjp] needs queries and cotangent (B, Hq, L, D), keys and values (B, Hkv, S, D) with "
        "Hkv dividing Hq and 0 < L <= S, a block >= 0 and an unroll >= 1.");
  }
  return mx::array::make_arrays({queries.shape(), keys.shape(), keys.shape()},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<AttentionVJP>(
                                    s, scale, BlasSums{static_cast<size_t>(block), static_cast<size_t>(unroll), false,
                                                       threaded}),
                                {contiguous(queries, s), rows_contiguous(keys, s), rows_contiguous(values, s),
                                 contiguous(cotan, s)});
}

void register_packed_gemm(nb::module_& m);  // packed_gemm.cpp

}  // namespace mlx_med

NB_MODULE(_mlx_med_kernels, m) {
  using namespace nb::literals;
  m.doc() = "mlx-med's vectorized CPU kernels (bit-identical to MLX's own).";
  mlx_med::register_packed_gemm(m);
  m.def("swiglu", [](const mx::array& g, const mx::array& u) { return mlx_med::swiglu(g, u); }, "gate"_a, "up"_a,
        "silu(gate) * up.");
  m.def("swiglu_vjp", [](const mx::array& g, const mx::array& u, const mx::array& c) {
          auto grads = mlx_med::swiglu_vjp(g, u, c);
          return nb::make_tuple(grads[0], grads[1]);
        }, "gate"_a, "up"_a, "cotangent"_a, "(d_gate, d_up): MLX's gradients of silu(gate) * up.");
  m.def("logsumexp", [](const mx::array& x) { return mlx_med::logsumexp(x); }, "x"_a,
        "log(sum(exp(x))) over the last axis, kept as a size-1 axis.");
  m.def("softmax_vjp", [](const mx::array& y, const mx::array& c) { return mlx_med::softmax_vjp(y, c); },
        "output"_a, "cotangent"_a, "MLX's gradient of the softmax over the last axis, from its output.");
  m.def("causal_softmax", [](const mx::array& x) { return mlx_med::causal_softmax(x); }, "scores"_a,
        "Softmax over the last axis under a causal mask aligned to the last keys.");
  m.def("causal_softmax_vjp", [](const mx::array& y, const mx::array& c) {
          return mlx_med::causal_softmax_vjp(y, c);
        }, "output"_a, "cotangent"_a, "The gradient of causal_softmax, from its output.");
  m.def("cross_entropy", [](const mx::array& x, const mx::array& t) { return mlx_med::cross_entropy(x, t); },
        "logits"_a, "targets"_a, "MLX's cross-entropy of class-index targets over the last axis, per row.");
  m.def("cross_entropy_vjp", [](const mx::array& x, const mx::array& t, const mx::array& c) {
          return mlx_med::cross_entropy_vjp(x, t, c);
        }, "logits"_a, "targets"_a, "cotangent"_a, "MLX's gradient of the cross-entropy w.r.t. the logits.");
  m.def("rope", [](const mx::array& x, const mx::array& o, int dims, float base, float scale) {
          return mlx_med::rope(x, o, dims, base, scale);
        }, "x"_a, "offset"_a, "dims"_a, "base"_a, "scale"_a,
        "mx.fast.rope(x, dims, traditional=False, base=, scale=, offset=) as MLX computes it on the CPU.");
  m.def("rope_vjp", [](const mx::array& c, const mx::array& o, int dims, float base, float scale) {
          return mlx_med::rope_vjp(c, o, dims, base, scale);
        }, "cotangent"_a, "offset"_a, "dims"_a, "base"_a, "scale"_a, "MLX's gradient of that RoPE w.r.t. x.");
  m.def("rms_norm", [](const mx::array& x, const mx::array& w, float eps) { return mlx_med::rms_norm(x, w, eps); },
        "x"_a, "weight"_a, "eps"_a, "mx.fast.rms_norm(x, weight, eps) as MLX computes it on the CPU.");
  m.def("rms_norm_vjp", [](const mx::array& x, const mx::array& w, const mx::array& c, float eps) {
          auto parts = mlx_med::rms_norm_vjp(x, w, c, eps);
          return nb::make_tuple(parts[0], parts[1]);
        }, "x"_a, "weight"_a, "cotangent"_a, "eps"_a,
        "MLX's gradient of that RMSNorm w.r.t. x, in its two parts (through x * r, through x * x).");
  m.def("decode_attention",
        [](const mx::array& q, const mx::array& k, const mx::array& v, std::optional<mx::array> mask,
           int mask_kind, float scale, int block, int unroll, bool small_scores, bool threaded) {
          return mlx_med::decode_attention(q, k, v, mask, mask_kind, scale, block, unroll, small_scores, threaded);
        }, "queries"_a, "keys"_a, "values"_a, "mask"_a.none(), "mask_kind"_a, "scale"_a, "block"_a, "unroll"_a,
        "small_scores"_a, "threaded"_a = false,
        "MLX's CPU scaled_dot_product_attention in one pass; the matmuls' inner sums cut in blocks of `block` "
        "(0: none) the way OpenBLAS's level-3 driver cuts them (unroll: its GEMM_UNROLL_M; `threaded`: its "
        "threaded driver's halving instead); with `small_scores`, the scores its AVX-512 small-matrix kernel "
        "takes are summed as that kernel does.");
  m.def("attention_vjp",
        [](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& c, float scale, int block,
           int unroll, bool threaded) {
          auto grads = mlx_med::attention_vjp(q, k, v, c, scale, block, unroll, threaded);
          return nb::make_tuple(grads[0], grads[1], grads[2]);
        }, "queries"_a, "keys"_a, "values"_a, "cotangent"_a, "scale"_a, "block"_a, "unroll"_a, "threaded"_a,
        "(d_queries, d_keys, d_values): MLX's gradients of its CPU causal attention (no cache), each sum cut "
        "as decode_attention's (block 0: one chain over its inner dimension).");
  m.def("threads", &mlx_med::kernel_threads, "The most threads one kernel call splits its rows over.");
  m.def("isa", &mlx_med::isa, "The instruction set the kernels run with on this CPU.");
  m.def("softmax", [](const mx::array& x) { return mlx_med::softmax(x); }, "x"_a, "Softmax over the last axis.");
}
