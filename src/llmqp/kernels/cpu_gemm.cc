// llmqp_gemm_f32 / llmqp_gemm_bf16: y[M, N] = x[M, K] @ W for a small number of rows M, W packed in column
// panels (wp[p, k, j] = W[k, p * 64 + j], zero past N), as XLA FFI custom calls on the CPU. x, y and every sum
// are f32; W is f32, or bf16 (half the bytes to read), each weight widened exactly to f32 as it is loaded, so
// a bf16 product gives the bits of the f32 product on the widened matrix.
//
// Why: on a CPU a one-token step is bound by reading the weights, and a product of 2-16 rows should cost
// about the same as one row. XLA:CPU's and OpenBLAS's small-M f32 GEMMs run 2-4x slower than that
// (benchmarks/limits.py). This kernel streams each 64-column panel from memory once, contiguously, in k-blocks
// of 32 rows: every group of rows takes its tiles of a block (up to 4 rows x 64 columns of accumulators in
// vector registers with AVX-512; with 256-bit vectors, 1 row x 64 columns or 2-3 rows x 32 columns) while the
// next block is prefetched, so the arithmetic of many rows overlaps the stream (taking the row groups one
// after another over the whole panel left memory idle during all but the first: on an AVX2 machine 8 rows
// cost 1.7x one row, now 1.36x). The panels are split over XLA's own intra-op thread pool (parallel.h).
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
#include <type_traits>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;

// Vectors as wide as the machine's registers: 16 floats with AVX-512 (32 registers), else 8 (AVX2: 16
// registers). A tile is R rows x C vectors of accumulators; the widest tiles that stay in registers (no
// spills: a 64-byte vector on AVX2 is two registers, and 4 rows x 64 columns of them spilled every
// iteration, 4-13x slower than XLA's dot on an AVX2 machine): rows per tile in ForGroups, columns in Cols.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
typedef float uvec __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));  // an unaligned load
typedef uint16_t uhvec __attribute__((vector_size(kLanes * 2), aligned(2), may_alias));  // kLanes bf16, unaligned
typedef uint32_t ivec __attribute__((vector_size(kLanes * 4)));

// kLanes weights from w as f32: f32 as they are; bf16 (the top half of an f32) widened exactly, by a shift.
inline vec LoadW(const float* w) { return *reinterpret_cast<const uvec*>(w); }
inline vec LoadW(const uint16_t* w) {
  return reinterpret_cast<vec>(__builtin_convertvector(*reinterpret_cast<const uhvec*>(w), ivec) << 16);
}

constexpr int kVectors = kPanel / kLanes;       // vectors across a panel: 4 (AVX-512) or 8
constexpr int kRegs = kLanes == 16 ? 24 : 12;   // accumulators that leave room for weights and x
constexpr int64_t kBlock = 32;                  // panel rows per k-block: 8 KB, in L1
constexpr int64_t kRowsMax = 64;                // rows whose accumulators one pass over a panel keeps

// Columns of a tile for R rows: the whole panel where R rows of it fit in registers, else a strip of C vectors.
template <int R>
constexpr int Cols() {
  return R * kVectors <= kRegs ? kVectors : (kRegs / R >= 4 ? 4 : 2);
}

// Rows [k0, k1) of the C vectors of a panel from vector v0 on, for R rows of x, added to their accumulators
// (acc: kVectors per row): one FMA per k per element, in k order. Meanwhile it prefetches `npf` cache lines from
// `pf` on (its share of the next k-block), spread over its iterations.
template <int R, int C, class W>
inline void Tile(const float* __restrict x, int64_t K, const W* __restrict wp, int v0, int64_t k0, int64_t k1,
                 vec* __restrict acc, const char* pf, int64_t npf) {
  vec a[R][C];  // (the loops over R and C are unrolled so that the accumulators stay in registers)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[r][c] = acc[r * kVectors + v0 + c];
  const int64_t n = k1 - k0, per = n > 0 ? (npf + n - 1) / n : 0;
  int64_t line = 0;
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t j = 0; j < per && line < npf; ++j, ++line) __builtin_prefetch(pf + 64 * line, 0, 3);
    const W* w = wp + k * kPanel + v0 * kLanes;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vec wc = LoadW(w + c * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][c] += x[r * K + k] * wc;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r * kVectors + v0 + c] = a[r][c];
}

constexpr int kWide = kLanes == 16 ? 4 : 3;  // rows of the widest tile that stays in registers

// f(std::integral_constant<int, R>, r) for the row groups of `rows` rows: groups of kWide rows (4 with AVX-512,
// 3 with AVX2), then of 2, then 1.
template <class F>
void ForGroups(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kWide <= rows; r += kWide) f(std::integral_constant<int, kWide>{}, r);
  for (; r + 2 <= rows; r += 2) f(std::integral_constant<int, 2>{}, r);
  for (; r < rows; ++r) f(std::integral_constant<int, 1>{}, r);
}

// The tiles of one k-block: each row group's strips in turn. Tile t of the G gets lines [t L / G, (t + 1) L / G)
// of the L lines to prefetch, so the next block streams in while every tile runs.
template <class W>
struct Block {
  const float* x;
  int64_t K;
  const W* wp;
  int64_t k0, k1;
  vec* acc;
  const char* pf;
  int64_t lines, tiles, t;

  template <int R>
  void Group(std::integral_constant<int, R>, int64_t r) {
    constexpr int C = Cols<R>();
    for (int v0 = 0; v0 < kVectors; v0 += C, ++t)
      Tile<R, C, W>(x + r * K, K, wp, v0, k0, k1, acc + r * kVectors, pf + 64 * (t * lines / tiles),
                 (t + 1) * lines / tiles - t * lines / tiles);
  }
};

// y[rows, panel's columns] for up to kRowsMax rows: the panel is read from memory once, in k-blocks, each
// block's tiles for all the rows taken while the next block is prefetched.
template <class W>
void PanelRows(const float* __restrict x, int64_t rows, int64_t K, const W* __restrict wp, float* __restrict y,
               int64_t ldy, int64_t ncols) {
  vec acc[kRowsMax * kVectors];
  for (int64_t i = 0; i < rows * kVectors; ++i) acc[i] = vec{};
  int64_t tiles = 0;
  ForGroups(rows, [&](auto R, int64_t) { tiles += kVectors / Cols<decltype(R)::value>(); });
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min(K, k0 + kBlock);
    // Prefetch the next block (the rest of this panel, else the start of the next one: panels lie end to end)
    // where the block takes more than one tile. One tile (one row) of f32 weights is a plain stream, which the
    // hardware prefetcher alone reads faster (AVX2 machine, 120 products of a step: 21.7 ms against 27.3 with
    // it); of bf16 weights, half as many bytes per FMA, the prefetch helps (13.0 ms against 15.0 without).
    const int64_t lines = (tiles > 1 || sizeof(W) == 2) ? kBlock * kPanel * static_cast<int64_t>(sizeof(W)) / 64 : 0;
    const char* pf = reinterpret_cast<const char*>(wp + k1 * kPanel);
    if constexpr (!std::is_same_v<W, float>) {
      if (tiles > 1) {  // widen the block once into L1 rather than once per row group
        alignas(64) float buf[kBlock * kPanel];
        for (int64_t i = 0; i < (k1 - k0) * kPanel; i += kLanes)
          *reinterpret_cast<vec*>(buf + i) = LoadW(wp + k0 * kPanel + i);
        Block<float> b{x + k0, K, buf, 0, k1 - k0, acc, pf, lines, tiles, 0};
        ForGroups(rows, [&](auto R, int64_t r) { b.Group(R, r); });
        continue;
      }
    }
    Block<W> b{x, K, wp, k0, k1, acc, pf, lines, tiles, 0};
    ForGroups(rows, [&](auto R, int64_t r) { b.Group(R, r); });
  }
  for (int64_t r = 0; r < rows; ++r) {
    float out[kPanel];
    std::memcpy(out, acc + r * kVectors, sizeof out);
    std::memcpy(y + r * ldy, out, ncols * sizeof(float));
  }
}

template <class W>
struct Work {
  const float* x;
  const W* wp;
  float* y;
  int64_t m, k, n, panels, chunks;
};

template <class W>
void RunChunk(const Work<W>& w, int64_t c) {
  const int64_t p0 = c * w.panels / w.chunks, p1 = (c + 1) * w.panels / w.chunks;
  for (int64_t r0 = 0; r0 < w.m; r0 += kRowsMax)
    for (int64_t p = p0; p < p1; ++p)
      PanelRows(w.x + r0 * w.k, std::min(kRowsMax, w.m - r0), w.k, w.wp + p * w.k * kPanel,
                w.y + r0 * w.n + p * kPanel, w.n, std::min(kPanel, w.n - p * kPanel));
}

template <ffi::DataType T>
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> wp, ffi::ResultBuffer<ffi::F32> y) {
  using W = ffi::NativeType<T>;
  const auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("llmqp_gemm: packed weights must be (panels, K, 64)");
  if (xd.size() < 1 || yd.size() != xd.size())
    return ffi::Error::InvalidArgument("llmqp_gemm: x and y must have the same rank");
  const int64_t k = wd[1], panels = wd[0], n = yd[yd.size() - 1];
  if (xd[xd.size() - 1] != k)
    return ffi::Error::InvalidArgument("llmqp_gemm: x's last dimension is not the weights' K");
  if (n <= (panels - 1) * kPanel || n > panels * kPanel)
    return ffi::Error::InvalidArgument("llmqp_gemm: N does not match the number of panels");
  const int64_t m = k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / k;
  for (size_t i = 0; i + 1 < xd.size(); ++i)
    if (xd[i] != yd[i]) return ffi::Error::InvalidArgument("llmqp_gemm: x and y leading dimensions differ");
  if (m == 0 || n == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work<W>>();
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

// The handler's signature for weights of type T (f32 or bf16): x, the packed weights, y.
template <ffi::DataType T>
auto GemmBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmqpGemmF32, Gemm<ffi::F32>, GemmBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmqpGemmBF16, Gemm<ffi::BF16>, GemmBinding<ffi::BF16>());
