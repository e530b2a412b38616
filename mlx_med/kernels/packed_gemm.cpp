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
struct BlasCut {
  size_t q, unroll;
  bool threaded;
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

// Rows of the weight per kernel call: a panel of up to 192 x 448 floats (344 KB) stays in L2 while
// the kernel runs every activation row against it, as OpenBLAS's GEMM_P does.
constexpr size_t kPanelRows = 192;

static void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("[mlx_med.packed_matmul] ") + what);
}

mx::array pack_weight(const mx::array& weight, int q, int unroll, bool threaded) {
  std::string reason;
  const OpenBlasKernels* blas = openblas_kernels(&reason);
  require(blas != nullptr, ("OpenBLAS's kernels are not available: " + reason).c_str());
  require(weight.ndim() == 2 && weight.dtype() == mx::float32 && q >= 0 && unroll >= 1,
          "needs a float32 (N, K) weight, q >= 0 and unroll >= 1.");
  mx::array w = mx::contiguous(weight, false, mx::Device::cpu);  // evaluated here: the copy is eager
  mx::eval(w);
  size_t N = w.shape(0), K = w.shape(1), floats;
  auto blocks = inner_blocks(K, BlasCut{size_t(q), size_t(unroll), threaded});
  auto offsets = block_offsets(N, blocks, &floats);
  mx::array packed(mx::allocator::malloc(floats * sizeof(float)), {static_cast<int>(floats)}, mx::float32);
  float* out = const_cast<float*>(aligned(packed.data<float>()));
  for (size_t b = 0; b < blocks.size(); b++) {
    blas->pack_a(blocks[b].second, N, w.data<float>() + blocks[b].first, K, out + offsets[b]);
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
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
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
    return std::string(name()) == other.name() && N_ == o.N_ && cut_.q == o.cut_.q &&
           cut_.unroll == o.cut_.unroll && cut_.threaded == o.cut_.threaded;
  }

 private:
  size_t N_;
  BlasCut cut_;
};

mx::array packed_matmul(const mx::array& x, const mx::array& packed, int N, int q, int unroll, bool threaded,
                        mx::StreamOrDevice s_ = {}) {
  auto s = mx::to_stream(s_);
  require(s.device == mx::Device::cpu, "runs on the CPU only.");
  require(openblas_kernels(nullptr) != nullptr, "OpenBLAS's kernels are not available.");
  require(q >= 0 && unroll >= 1 && N > 0 && x.ndim() >= 1 && x.shape(-1) > 0, "needs q >= 0, unroll >= 1, N > 0.");
  BlasCut cut{size_t(q), size_t(unroll), threaded};
  require(x.dtype() == mx::float32 && packed.dtype() == mx::float32 && packed.ndim() == 1 &&
              static_cast<size_t>(packed.size()) == packed_floats(N, x.shape(-1), cut),
          "needs float32 x (..., K) and a weight pack_weight packed for (N, K) under the same q, unroll and threaded.");
  auto shape = x.shape();
  shape.back() = N;
  return mx::array(shape, mx::float32,
                   std::make_shared<PackedMatmul>(s, N, cut),
                   {mx::contiguous(x, false, s), packed});
}

void register_packed_gemm(nb::module_& m) {
  using namespace nb::literals;
  m.def("openblas_core", [] {
          std::string reason;
          const OpenBlasKernels* blas = openblas_kernels(&reason);
          return nb::make_tuple(blas != nullptr, reason);
        },
        "(True, OpenBLAS's core name) when its per-core sgemm kernels can be called, else (False, why not).");
  m.def("pack_weight", &pack_weight, "weight"_a, "q"_a, "unroll"_a, "threaded"_a,
        "A float32 (N, K) weight packed once in OpenBLAS's layout, inner blocks cut as its driver cuts them.");
  m.def("packed_matmul", [](const mx::array& x, const mx::array& packed, int n, int q, int unroll, bool threaded) {
          return packed_matmul(x, packed, n, q, unroll, threaded);
        }, "x"_a, "packed"_a, "n"_a, "q"_a, "unroll"_a, "threaded"_a,
        "x @ weight.T over a weight from pack_weight (same q, unroll and threaded), with OpenBLAS's kernel.");
}

}  // namespace mlx_med
