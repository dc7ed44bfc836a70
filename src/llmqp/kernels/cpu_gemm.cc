// llmqp_gemm_f32: y[M, N] = x[M, K] @ W for a small number of rows M, W packed in column panels
// (wp[p, k, j] = W[k, p * 64 + j], zero past N), as an XLA FFI custom call on the CPU.
//
// Why: on a CPU a one-token step is bound by reading the weights, and a product of 2-16 rows should cost
// about the same as one row. XLA:CPU's and OpenBLAS's small-M f32 GEMMs run 2-4x slower than that
// (benchmarks/limits.py). This kernel streams each 64-column panel once, contiguously, keeping up to 4 rows
// x 64 columns of accumulators in vector registers (AVX-512; with 256-bit vectors, 1 row x 64 columns or 2-3
// rows x 32 columns), and splits the panels over XLA's own intra-op thread pool (parallel.h).
//
// Every output element is summed in the same order (k = 0, 1, ..., K-1, one fused multiply-add each)
// whatever M is and whichever rows it is computed with, so a forward of T positions gives bit-identical
// hidden states to T one-token steps (draft verification and forced runs rely on it).
//
// Built at first use by llmqp.kernels (g++ -O3 -march=native); llmqp falls back to XLA's dot without it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;

// Vectors as wide as the machine's registers: 16 floats with AVX-512 (32 registers), else 8 (AVX2: 16
// registers). A tile is R rows x C vectors of accumulators; the widest tiles that stay in registers (no
// spills: a 64-byte vector on AVX2 is two registers, and 4 rows x 64 columns of them spilled every
// iteration, 4-13x slower than XLA's dot on an AVX2 machine): rows per tile in RunChunk, columns in Panel.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
typedef float uvec __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));  // an unaligned load

// Columns [c0, c0 + C * kLanes) of one panel for R rows: y[r, c0 + j] = sum_k x[r, k] * wp[k, c0 + j].
template <int R, int C>
inline void Tile(const float* __restrict x, int64_t K, const float* __restrict wp, int64_t c0, float* __restrict y,
                 int64_t ldy, int64_t ncols) {
  vec acc[R][C];  // (the loops over R and C are unrolled so that the accumulators stay in registers)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = wp + k * kPanel + c0;
#pragma GCC unroll 8
    for (int i = 0; i < C * kLanes; i += 16) __builtin_prefetch(w + 16 * kPanel + i, 0, 3);  // 16 rows ahead
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vec wc = *reinterpret_cast<const uvec*>(w + c * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][c] += x[r * K + k] * wc;
    }
  }
  const int64_t n = std::min<int64_t>(C * kLanes, ncols - c0);
  if (n <= 0) return;
  for (int r = 0; r < R; ++r) {
    float out[C * kLanes];
    std::memcpy(out, acc[r], sizeof out);
    std::memcpy(y + r * ldy + c0, out, n * sizeof(float));
  }
}

// One panel for R rows: the whole panel per pass where R rows of it fit in registers, else in column strips.
template <int R>
inline void Panel(const float* __restrict x, int64_t K, const float* __restrict wp, float* __restrict y,
                  int64_t ldy, int64_t ncols) {
  constexpr int kVectors = kPanel / kLanes;              // vectors across a panel: 4 (AVX-512) or 8
  constexpr int kRegs = kLanes == 16 ? 24 : 12;          // accumulators that leave room for weights and x
  constexpr int C = R * kVectors <= kRegs ? kVectors : (kRegs / R >= 4 ? 4 : 2);
  for (int64_t c0 = 0; c0 < kPanel; c0 += C * kLanes) Tile<R, C>(x, K, wp, c0, y, ldy, ncols);
}

struct Work {
  const float* x;
  const float* wp;
  float* y;
  int64_t m, k, n, panels, chunks;
};

void RunChunk(const Work& w, int64_t c) {
  const int64_t p0 = c * w.panels / w.chunks, p1 = (c + 1) * w.panels / w.chunks;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t ncols = std::min(kPanel, w.n - p * kPanel);
    const float* panel = w.wp + p * w.k * kPanel;
    float* y = w.y + p * kPanel;
    int64_t r = 0;
    if (kLanes == 16)  // 4 rows x 4 vectors: 16 of the 32 registers
      for (; r + 4 <= w.m; r += 4) Panel<4>(w.x + r * w.k, w.k, panel, y + r * w.n, w.n, ncols);
    else  // 3 rows x 4 vectors: 12 of the 16
      for (; r + 3 <= w.m; r += 3) Panel<3>(w.x + r * w.k, w.k, panel, y + r * w.n, w.n, ncols);
    for (; r + 2 <= w.m; r += 2) Panel<2>(w.x + r * w.k, w.k, panel, y + r * w.n, w.n, ncols);
    for (; r < w.m; ++r) Panel<1>(w.x + r * w.k, w.k, panel, y + r * w.n, w.n, ncols);
  }
}

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("llmqp_gemm_f32: packed weights must be (panels, K, 64)");
  if (xd.size() < 1 || yd.size() != xd.size())
    return ffi::Error::InvalidArgument("llmqp_gemm_f32: x and y must have the same rank");
  const int64_t k = wd[1], panels = wd[0], n = yd[yd.size() - 1];
  if (xd[xd.size() - 1] != k)
    return ffi::Error::InvalidArgument("llmqp_gemm_f32: x's last dimension is not the weights' K");
  if (n <= (panels - 1) * kPanel || n > panels * kPanel)
    return ffi::Error::InvalidArgument("llmqp_gemm_f32: N does not match the number of panels");
  const int64_t m = k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / k;
  for (size_t i = 0; i + 1 < xd.size(); ++i)
    if (xd[i] != yd[i]) return ffi::Error::InvalidArgument("llmqp_gemm_f32: x and y leading dimensions differ");
  if (m == 0 || n == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->wp = wp.typed_data();
  work->y = y->typed_data();
  work->m = m;
  work->k = k;
  work->n = n;
  work->panels = panels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunks = std::min<int64_t>(panels, 4 * threads);
  llmqp::ParallelChunks(pool, work->chunks, threads, [work](int64_t c) { RunChunk(*work, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmqpGemmF32, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
