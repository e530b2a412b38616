// A model's projections (x @ W^T) over weights packed once, with OpenBLAS's own compute kernel.
//
// OpenBLAS's sgemm packs both operands into its kernel's layout on every call. For a decode step's few
// dozen rows the weight is by far the larger one: packing it was a quarter of the step's GEMM time,
// for weights that do not change from step to step. OpenBLAS has no interface for a pre-packed
// operand, but its DYNAMIC_ARCH builds (Debian's, Fedora's) export each core's kernels by name:
// sgemm_kernel_<CORE>, sgemm_incopy_<CORE> (the copy that packs a transposed A, here the weight) and
// sgemm_oncopy_<CORE> (B, here the activations). So the weight is packed once with the library's own
// copy, and every call packs only the activations and runs the library's own kernel over the same
// blocks its level-3 driver makes: the inner dimension cut at GEMM_Q (BlasCut), each block's products
// added to the zeroed output in turn. Every output is then computed by the same instructions on the
// same packed numbers as inside cblas_sgemm, so the bits are MLX's; Python checks that on the model's
// own shapes before using it (mlx_med/kernels/packed.py), and keeps MLX's matmul where they differ.
// The outputs' columns (the weight's rows) are split over the worker pool; each part runs whole panels.

#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "primitive_io.h"
#include "worker_pool.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace mlx_med {

using blaslong = long;  // OpenBLAS's BLASLONG on LP64 Linux

// The three per-core functions of the OpenBLAS whose cblas_sgemm MLX calls.
struct OpenBlasKernels {
  std::string core;  // e.g. "COOPERLAKE", "ZEN", "HASWELL"
  int (*kernel)(blaslong m, blaslong n, blaslong k, float alpha, float* a, float* b, float* c, blaslong ldc);
  int (*pack_a)(blaslong k, blaslong m, const float* a, blaslong lda, float* out);  // sgemm_incopy
  int (*pack_b)(blaslong k, blaslong n, const float* b, blaslong ldb, float* out);  // sgemm_oncopy
};

// Found in the library that defines the cblas_sgemm this process resolves (the one MLX calls);
// nullptr with why not in `reason`.
static const OpenBlasKernels* openblas_kernels(std::string* reason) {
  static std::string why;
  static const OpenBlasKernels* found = [] () -> const OpenBlasKernels* {
    void* sgemm = dlsym(RTLD_DEFAULT, "cblas_sgemm");
    Dl_info info{};
    if (sgemm == nullptr || dladdr(sgemm, &info) == 0 || info.dli_fname == nullptr) {
      why = "no cblas_sgemm in this process";
      return nullptr;
    }
    void* library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (library == nullptr) {
      why = std::string("cannot reopen ") + info.dli_fname;
      return nullptr;
    }
    auto corename = reinterpret_cast<const char* (*)()>(dlsym(library, "openblas_get_corename"));
    if (corename == nullptr) {
      why = std::string(info.dli_fname) + " is not OpenBLAS";
      return nullptr;
    }
    auto* k = new OpenBlasKernels();
    for (const char* c = corename(); *c; c++) k->core += static_cast<char>(std::toupper(static_cast<unsigned char>(*c)));
    auto symbol = [&](const char* stem) { return dlsym(library, (std::string(stem) + "_" + k->core).c_str()); };
    k->kernel = reinterpret_cast<decltype(k->kernel)>(symbol("sgemm_kernel"));
    k->pack_a = reinterpret_cast<decltype(k->pack_a)>(symbol("sgemm_incopy"));
    k->pack_b = reinterpret_cast<decltype(k->pack_b)>(symbol("sgemm_oncopy"));
    if (!k->kernel || !k->pack_a || !k->pack_b) {
      why = std::string(info.dli_fname) + " exports no sgemm kernels for its core " + k->core +
            " (not a DYNAMIC_ARCH build)";
      delete k;
      return nullptr;
    }
    return k;
  }();
  if (reason) *reason = found ? found->core : why;
  return found;
}

// Where OpenBLAS's level-3 driver cuts the inner dimension: GEMM_Q while at least 2Q remain; between
// Q and 2Q, half, rounded up to GEMM_UNROLL_M by the one-thread driver and to a whole number by the
// threaded one (driver/level3/level3.c and level3_thread.c).
//
// Some cores' kernels also add a product's chain by its place in the kernel call: Haswell's and Zen's
// (sgemm_kernel_8x4_haswell_2.c) split the inner sum into two chains on the first and last 8 rows of a
// 12-column call and not elsewhere. For those, every call must cover exactly the tile the driver gives
// it (driver_plan); `threads` 0 means any tiling gives the same bits (the AVX-512 kernels).
struct BlasCut {
  size_t q, unroll;
  bool threaded;
  size_t threads = 0;       // OpenBLAS's threads (1: level3.c's tiling, more: level3_thread.c's); 0: free tiling
  size_t p = 0;             // GEMM_P: the rows of A (here the weight's) per kernel call
  size_t switch_ratio = 0;  // SWITCH_RATIO: the fewest columns per thread
  size_t prefered = 1;      // GEMM_PREFERED_SIZE: thread ranges are rounded up to it
  size_t unroll_n = 0;      // GEMM_UNROLL_N
  size_t jj = 0;            // the widest kernel call over a thread's own columns (3 * GEMM_UNROLL_N)

  bool operator==(const BlasCut&) const = default;
};

static std::vector<std::pair<size_t, size_t>> inner_blocks(size_t K, BlasCut cut) {
  std::vector<std::pair<size_t, size_t>> blocks;  // (start, length)
  for (size_t start = 0; start < K;) {
    size_t length = K - start;
    if (cut.q > 0 && length >= 2 * cut.q) {
      length = cut.q;
    } else if (cut.q > 0 && length > cut.q) {
      length = cut.threaded ? (length + 1) / 2 : (length / 2 + cut.unroll - 1) / cut.unroll * cut.unroll;
    }
    blocks.emplace_back(start, length);
    start += length;
  }
  return blocks;
}

// The packed weight's layout: block by block, each the library's packing of all N rows over that
// block's inner range (N * length floats), each block starting on a 64-byte boundary as the library's
// own buffers do (its kernels may load them aligned). Rows [r, ...) of a block start at r * length
// when r is a multiple of the copy's row group (16 or 8 rows): kRowAlign is a multiple of both.
constexpr size_t kRowAlign = 32;
constexpr size_t kAlignFloats = 16;   // 64 bytes
constexpr size_t kSlackFloats = 256;  // past the end: the kernels may read ahead of the last panel

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
static const float* aligned(const float* p) {
  return reinterpret_cast<const float*>(round_up(reinterpret_cast<uintptr_t>(p), kAlignFloats * sizeof(float)));
}

// Each block's offset from the aligned start for `rows` rows of the packed operand, and the floats a
// buffer needs (alignment and slack included).
static std::vector<size_t> block_offsets(size_t rows, const std::vector<std::pair<size_t, size_t>>& blocks,
                                         size_t* floats) {
  std::vector<size_t> offsets;
  size_t at = 0;
  for (auto [start, length] : blocks) {
    offsets.push_back(at);
    at += round_up(rows * length, kAlignFloats);
  }
  *floats = at + kAlignFloats + kSlackFloats;
  return offsets;
}

// The threaded driver's tiling (level3_thread.c; BlasCut above): how it splits the weight's rows
// (A's, here M) and the activation rows (B's columns, here n) over its threads, and the kernel calls
// each thread makes.

// level3_thread.c's round_up: a thread's range rounded up to `multiple`, unless that is more than is left.
static size_t blas_round_up(size_t left, size_t width, size_t multiple) {
  if (multiple > left || width <= multiple) return width;
  return round_up(width, multiple);
}

// gemm_driver's split of `total` over `parts` threads, each at least `least` wide: parts + 1 bounds.
static std::vector<size_t> thread_ranges(size_t total, size_t parts, size_t prefered, size_t least) {
  std::vector<size_t> bounds{0};
  for (size_t left = total; left > 0;) {
    size_t done = bounds.size() - 1, shares = parts > done ? parts - done : 1;
    size_t width = std::max((left + shares - 1) / shares, least);
    width = std::min(blas_round_up(left, width, prefered), left);
    left -= width;
    bounds.push_back(bounds.back() + width);
  }
  while (bounds.size() < parts + 1) bounds.push_back(bounds.back());
  return bounds;
}

// The threads the driver puts on the rows (threads_m) and in all, for an M x n product (its CNAME).
static std::pair<size_t, size_t> driver_threads(size_t M, size_t n, const BlasCut& c) {
  size_t threads_m = 1, threads_n = 1;
  if (c.threads == 1) return {1, 1};
  if (M >= 2 * c.switch_ratio) {
    threads_m = c.threads;
    while (M < threads_m * c.switch_ratio) threads_m /= 2;
  }
  if (n >= c.switch_ratio * threads_m) {
    threads_n = (n + c.switch_ratio * threads_m - 1) / (c.switch_ratio * threads_m);
    if (threads_m * threads_n > c.threads) threads_n = c.threads / threads_m;
  }
  return {threads_m, threads_m * threads_n};
}

static std::vector<size_t> weight_ranges(size_t M, const BlasCut& c) {
  return thread_ranges(M, driver_threads(M, 0, c).first, c.prefered, 0);
}

// A thread's first and later panels of its weight rows (GEMM_P, halved when under 2P, the halves rounded
// up to GEMM_UNROLL_M; the threaded driver's later panels halve (rows + 1) / 2, the rest rows / 2).
static size_t panel_rows(size_t rows, bool first, const BlasCut& c) {
  if (rows >= 2 * c.p) return c.p;
  if (rows > c.p) return ((first || c.threads == 1 ? rows / 2 : (rows + 1) / 2) + c.unroll - 1) / c.unroll * c.unroll;
  return rows;
}

struct Tile {
  size_t m0, m, n0, n;  // weight rows [m0, m0 + m) by activation rows [n0, n0 + n)
};

// Each thread's columns in halves (DIVIDE_RATE 2): the packed buffers other threads read whole.
template <typename F>
static void for_each_half(size_t from, size_t to, F&& f) {
  if (from >= to) return;
  size_t half = (to - from + 1) / 2;
  for (size_t js = from; js < to; js += half) f(js, std::min(to, js + half) - js);
}

// A thread's own columns [js, js + len) as its first panel runs them: pieces of `jj` columns, then of
// GEMM_UNROLL_N, then the rest (both drivers' min_jj).
template <typename F>
static void for_each_piece(size_t js, size_t len, const BlasCut& c, F&& f) {
  for (size_t jjs = js, piece; jjs < js + len; jjs += piece) {
    piece = js + len - jjs;
    if (piece >= c.jj) piece = c.jj;
    else if (piece > c.unroll_n) piece = c.unroll_n;
    f(jjs, piece);
  }
}

struct DriverPlan {
  std::vector<std::pair<size_t, size_t>> halves;  // every thread's column halves: how B is packed
  std::vector<std::vector<Tile>> panels;           // kernel calls by weight panel (disjoint outputs)
};

// The one-thread driver's (level3.c): the first panel over the columns in pieces, the later panels over
// all of them (packed as one buffer, since GEMM_R exceeds any decode batch).
static DriverPlan one_thread_plan(size_t M, size_t n, const BlasCut& c) {
  DriverPlan plan;
  plan.halves.emplace_back(0, n);
  size_t rows = panel_rows(M, true, c);
  std::vector<Tile> first;
  for_each_piece(0, n, c, [&](size_t jjs, size_t piece) { first.push_back({0, rows, jjs, piece}); });
  plan.panels.push_back(std::move(first));
  for (size_t is = rows; is < M; is += rows) {
    rows = panel_rows(M - is, false, c);
    plan.panels.push_back({Tile{is, rows, 0, n}});
  }
  return plan;
}

// inner_thread's kernel calls for one inner block (the same for every block), thread by thread.
static DriverPlan driver_plan(size_t M, size_t n, const BlasCut& c) {
  if (c.threads == 1) return one_thread_plan(M, n, c);
  auto [threads_m, threads] = driver_threads(M, n, c);
  auto m_bounds = thread_ranges(M, threads_m, c.prefered, 0);
  auto n_bounds = thread_ranges(n, threads, c.prefered, c.switch_ratio);
  DriverPlan plan;
  for (size_t t = 0; t < threads; t++) {
    for_each_half(n_bounds[t], n_bounds[t + 1], [&](size_t js, size_t len) { plan.halves.emplace_back(js, len); });
  }
  for (size_t me = 0; me < threads; me++) {
    size_t group = me / threads_m, m_from = m_bounds[me % threads_m], m_to = m_bounds[me % threads_m + 1];
    if (m_from >= m_to) continue;
    auto others = [&](size_t start, auto&& f) {  // the group's threads from `start` on, cyclically
      for (size_t i = 0; i < threads_m; i++) f(group * threads_m + (start - group * threads_m + i) % threads_m);
    };
    size_t rows = panel_rows(m_to - m_from, true, c);
    std::vector<Tile> first;
    // its own columns, packed and run in pieces of up to 3 * GEMM_UNROLL_N
    for_each_half(n_bounds[me], n_bounds[me + 1], [&](size_t js, size_t len) {
      for_each_piece(js, len, c, [&](size_t jjs, size_t piece) { first.push_back({m_from, rows, jjs, piece}); });
    });
    others(me + 1, [&](size_t other) {  // the other threads' halves, whole
      if (other == me) return;
      for_each_half(n_bounds[other], n_bounds[other + 1],
                    [&](size_t js, size_t len) { first.push_back({m_from, rows, js, len}); });
    });
    plan.panels.push_back(std::move(first));
    for (size_t is = m_from + rows; is < m_to; is += rows) {
      rows = panel_rows(m_to - is, false, c);
      std::vector<Tile> later;
      others(me, [&](size_t other) {
        for_each_half(n_bounds[other], n_bounds[other + 1],
                      [&](size_t js, size_t len) { later.push_back({is, rows, js, len}); });
      });
      plan.panels.push_back(std::move(later));
    }
  }
  return plan;
}

// Rows of the weight per kernel call: a panel of up to 192 x 448 floats (344 KB) stays in L2 while
// the kernel runs every activation row against it, as OpenBLAS's GEMM_P does.
constexpr size_t kPanelRows = 192;

static void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("[mlx_med.packed_matmul] ") + what);
}

mx::array pack_weight(const mx::array& weight, const BlasCut& cut) {
  std::string reason;
  const OpenBlasKernels* blas = openblas_kernels(&reason);
  require(blas != nullptr, ("OpenBLAS's kernels are not available: " + reason).c_str());
  require(weight.ndim() == 2 && weight.dtype() == mx::float32, "needs a float32 (N, K) weight.");
  mx::array w = mx::contiguous(weight, false, mx::Device::cpu);  // evaluated here: the copy is eager
  mx::eval(w);
  size_t N = w.shape(0), K = w.shape(1), floats;
  auto blocks = inner_blocks(K, cut);
  auto offsets = block_offsets(N, blocks, &floats);
  mx::array packed(mx::allocator::malloc(floats * sizeof(float)), {static_cast<int>(floats)}, mx::float32);
  float* out = const_cast<float*>(aligned(packed.data<float>()));
  // In the driver's tiling each thread's rows are packed apart (their last group of rows may be short).
  auto ranges = cut.threads ? weight_ranges(N, cut) : std::vector<size_t>{0, N};
  for (size_t b = 0; b < blocks.size(); b++) {
    auto [start, length] = blocks[b];
    for (size_t r = 0; r + 1 < ranges.size(); r++) {
      if (ranges[r] < ranges[r + 1]) {
        blas->pack_a(length, ranges[r + 1] - ranges[r], w.data<float>() + ranges[r] * K + start, K,
                     out + offsets[b] + ranges[r] * length);
      }
    }
  }
  return packed;
}

struct PackedCall {
  const float* x;       // (T, K) rows
  const float* packed;  // pack_weight's layout
  float* out;           // (T, N) rows
  size_t T, K, N;
  BlasCut cut;
};

// The driver's kernel calls exactly (driver_plan), the activations packed in its column halves; the
// weight panels are run over the worker pool, each panel's calls block after block.
static void driver_tiled_loop(const PackedCall& c, const OpenBlasKernels* blas,
                              const std::vector<std::pair<size_t, size_t>>& blocks, const std::vector<size_t>& x_offsets,
                              const std::vector<size_t>& w_offsets, const float* weight, float* packed_x) {
  DriverPlan plan = driver_plan(c.N, c.T, c.cut);
  for (size_t b = 0; b < blocks.size(); b++) {
    auto [start, length] = blocks[b];
    for (auto [js, len] : plan.halves) {
      blas->pack_b(length, len, c.x + js * c.K + start, c.K, packed_x + x_offsets[b] + js * length);
    }
  }
  worker_pool().run(plan.panels.size(), [&](size_t panel) {
    const auto& tiles = plan.panels[panel];
    for (const Tile& t : tiles) {
      for (size_t row = t.n0; row < t.n0 + t.n; row++) std::memset(c.out + row * c.N + t.m0, 0, t.m * sizeof(float));
    }
    for (size_t b = 0; b < blocks.size(); b++) {
      size_t length = blocks[b].second;
      for (const Tile& t : tiles) {
        blas->kernel(t.m, t.n, length, 1.0f, const_cast<float*>(weight + w_offsets[b] + t.m0 * length),
                     packed_x + x_offsets[b] + t.n0 * length, c.out + t.n0 * c.N + t.m0, c.N);
      }
    }
  });
}

static void packed_matmul_loop(const PackedCall& c, const OpenBlasKernels* blas, size_t threads) {
  auto blocks = inner_blocks(c.K, c.cut);
  size_t x_floats, w_floats;
  auto x_offsets = block_offsets(c.T, blocks, &x_floats);
  auto w_offsets = block_offsets(c.N, blocks, &w_floats);
  const float* weight = aligned(c.packed);
  // The activations packed once per call (every block), shared by the parts.
  thread_local std::vector<float> x_buffer;
  x_buffer.resize(x_floats);
  float* packed_x = const_cast<float*>(aligned(x_buffer.data()));
  if (c.cut.threads) return driver_tiled_loop(c, blas, blocks, x_offsets, w_offsets, weight, packed_x);
  for (size_t b = 0; b < blocks.size(); b++) {
    blas->pack_b(blocks[b].second, c.T, c.x + blocks[b].first, c.K, packed_x + x_offsets[b]);
  }
  size_t groups = (c.N + kRowAlign - 1) / kRowAlign;
  size_t parts = std::min(threads, groups);
  size_t per_part = (groups + parts - 1) / parts * kRowAlign;
  worker_pool().run(parts, [&](size_t part) {
    size_t first = part * per_part, end = std::min(c.N, first + per_part);
    if (first >= end) return;
    for (size_t t = 0; t < c.T; t++) std::memset(c.out + t * c.N + first, 0, (end - first) * sizeof(float));
    for (size_t b = 0; b < blocks.size(); b++) {
      size_t length = blocks[b].second;
      for (size_t row = first; row < end; row += kPanelRows) {
        size_t rows = std::min(kPanelRows, end - row);
        blas->kernel(rows, c.T, length, 1.0f, const_cast<float*>(weight + w_offsets[b] + row * length),
                     packed_x + x_offsets[b], c.out + row, c.N);
      }
    }
  });
}

// The floats pack_weight gives an (N, K) weight under this cut.
static size_t packed_floats(size_t N, size_t K, BlasCut cut) {
  size_t floats;
  block_offsets(N, inner_blocks(K, cut), &floats);
  return floats;
}

class PackedMatmul : public mx::Primitive {
 public:
  PackedMatmul(mx::Stream stream, size_t N, BlasCut cut) : mx::Primitive(stream), N_(N), cut_(cut) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encode_io(stream(), inputs, outputs);
    auto& out = outputs[0];
    const auto& x = inputs[0];
    size_t K = x.shape(-1);
    PackedCall call{x.data<float>(), inputs[1].data<float>(), out.data<float>(), x.size() / K, K, N_, cut_};
    const OpenBlasKernels* blas = openblas_kernels(nullptr);
    encoder.dispatch([call, blas]() { packed_matmul_loop(call, blas, kernel_threads()); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[mlx_med.packed_matmul] runs on the CPU only.");
  }
  const char* name() const override { return "MlxMedPackedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PackedMatmul&>(other);
    return std::string(name()) == other.name() && N_ == o.N_ && cut_ == o.cut_;
  }

 private:
  size_t N_;
  BlasCut cut_;
};

mx::array packed_matmul(const mx::array& x, const mx::array& packed, int N, const BlasCut& cut,
                        mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require(s.device == mx::Device::cpu, "runs on the CPU only.");
  require(openblas_kernels(nullptr) != nullptr, "OpenBLAS's kernels are not available.");
  require(N > 0 && x.ndim() >= 1 && x.shape(-1) > 0, "needs N > 0 and x (..., K).");
  require(cut.threads < 2 || N >= 2 * static_cast<int>(cut.switch_ratio),
          "needs N >= 2 * switch_ratio in the threaded driver's tiling (fewer rows take its one-thread driver).");
  require(x.dtype() == mx::float32 && packed.dtype() == mx::float32 && packed.ndim() == 1 &&
              static_cast<size_t>(packed.size()) == packed_floats(N, x.shape(-1), cut),
          "needs float32 x (..., K) and a weight pack_weight packed for (N, K) under the same cut.");
  auto shape = x.shape();
  shape.back() = N;
  return mx::array(shape, mx::float32,
                   std::make_shared<PackedMatmul>(s, N, cut),
                   {mx::contiguous(x, false, s), packed});
}

// The cut's fields in BlasCut's order (Python's packed.BlasCut), checked.
static BlasCut make_cut(int q, int unroll, bool threaded, int threads, int p, int switch_ratio, int prefered,
                        int unroll_n, int jj) {
  require(q >= 0 && unroll >= 1 && threads >= 0 && prefered >= 1, "needs q >= 0, unroll >= 1 and prefered >= 1.");
  require(threads == 0 || (p >= unroll && p % unroll == 0 && switch_ratio >= 1 && unroll_n >= 1 &&
                           jj >= unroll_n),
          "the driver's tiling needs p a multiple of unroll, switch_ratio >= 1 and jj >= unroll_n >= 1.");
  return BlasCut{size_t(q), size_t(unroll), threaded, size_t(threads), size_t(p), size_t(switch_ratio),
                 size_t(prefered), size_t(unroll_n), size_t(jj)};
}

void register_packed_gemm(nb::module_& m) {
  using namespace nb::literals;
  m.def("openblas_core", [] {
          std::string reason;
          const OpenBlasKernels* blas = openblas_kernels(&reason);
          return nb::make_tuple(blas != nullptr, reason);
        },
        "(True, OpenBLAS's core name) when its per-core sgemm kernels can be called, else (False, why not).");
  m.def("openblas_threads", [] {
          // looked up once: a packed layer asks at every call
          static auto threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
          return threads ? threads() : 0;
        },
        "The threads OpenBLAS runs a level-3 call on (0 when it is not OpenBLAS).");
  m.def("pack_weight",
        [](const mx::array& weight, int q, int unroll, bool threaded, int threads, int p, int switch_ratio,
           int prefered, int unroll_n, int jj) {
          return pack_weight(weight, make_cut(q, unroll, threaded, threads, p, switch_ratio, prefered, unroll_n, jj));
        },
        "weight"_a, "q"_a, "unroll"_a, "threaded"_a, "threads"_a = 0, "p"_a = 0, "switch_ratio"_a = 0,
        "prefered"_a = 1, "unroll_n"_a = 0, "jj"_a = 0,
        "A float32 (N, K) weight packed once in OpenBLAS's layout, inner blocks cut as its driver cuts them.");
  m.def("packed_matmul",
        [](const mx::array& x, const mx::array& packed, int n, int q, int unroll, bool threaded, int threads, int p,
           int switch_ratio, int prefered, int unroll_n, int jj) {
          return packed_matmul(x, packed, n,
                               make_cut(q, unroll, threaded, threads, p, switch_ratio, prefered, unroll_n, jj));
        },
        "x"_a, "packed"_a, "n"_a, "q"_a, "unroll"_a, "threaded"_a, "threads"_a = 0, "p"_a = 0, "switch_ratio"_a = 0,
        "prefered"_a = 1, "unroll_n"_a = 0, "jj"_a = 0,
        "x @ weight.T over a weight from pack_weight (the same cut), with OpenBLAS's kernel.");
}

}  // namespace mlx_med
