// llmqp_attention_f32: causal (optionally sliding-window) attention of a few query positions per row over an
// f32 KV cache, read where it lies, as an XLA FFI custom call on the CPU.
//
//   q    (B, T, H, hd)   queries after RoPE
//   k, v (B, S, KV, hd)  the cache with this chunk's keys and values already written
//   pos  (B, T) int32    absolute position of each query
//   out  (B, T, H, hd)   softmax(scale * q . k) . v over keys lo <= s <= pos (lo = pos - window + 1 for a
//                        sliding window, else 0); scores soft-capped (c * tanh(x / c)) where softcap > 0
//
// Why: XLA:CPU lowers attention of a decode step to dots that need a (B, KV)-major copy of the whole K and V
// cache in every layer (~5 ms a step for SmolLM2 at batch 1), and the multiply + reduce form used at batch > 1
// goes to reduce fusions that cost ~1.5 ms a layer at batch 8 (benchmarks/limits.py; the trunk at batch 8
// spent 54 of its 91 ms there). This kernel touches only the visible keys, once.
//
// Each (row, query, head) is computed alone, in a fixed order (keys in increasing position; every dot product
// over hd and every softmax sum in the same lane tree), so its result does not depend on the batch, the other queries in the chunk,
// or the cache length: a forward of T positions equals T one-token steps bit for bit (draft verification,
// forced runs and continuous batching rely on it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes are computed as 16-lane blocks (a head of hd = 16 C floats is C blocks) whatever the machine, in
// vectors as wide as its registers: one vector per block with AVX-512, two (lanes 0-7, 8-15) with AVX2, so
// nothing spills and every lane gets the same operations in the same order on both.
#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
constexpr int kA = 16 / kW;  // vectors per 16-lane block
typedef float vw __attribute__((vector_size(kW * 4)));
typedef int32_t vwi __attribute__((vector_size(kW * 4)));
typedef float uvw __attribute__((vector_size(kW * 4), aligned(4), may_alias));  // an unaligned load
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline vw Load(const float* p) { return *reinterpret_cast<const uvw*>(p); }

inline void Store(float* p, vw v) { *reinterpret_cast<uvw*>(p) = v; }

inline vw Splat(float x) { return vw{} + x; }

// The 16 lanes of a block (kA vectors) summed in a fixed tree (halves, then quarters, ...).
inline float HSum(const vw* a) {
  v8 s8;
  if constexpr (kW == 16)
    s8 = __builtin_shufflevector(a[0], a[0], 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(a[0], a[0], 8, 9, 10, 11, 12, 13, 14, 15);
  else
    s8 = a[0] + a[kA - 1];
  const v4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// e^x for x <= 0, lane by lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times
// 2^n), within ~2 ulp of the correctly rounded value; inputs below -87 give ~1e-38 instead of 0, which no
// softmax sum notices.
inline vw Exp(vw x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  const vw t = x * 1.44269504088896341f + 0.5f;
  vwi n = __builtin_convertvector(t, vwi);              // truncates toward zero
  n += (t < __builtin_convertvector(n, vw)) ? -1 : 0;   // floor
  const vw fn = __builtin_convertvector(n, vw);
  const vw r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const vw r2 = r * r;
  vw p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const vwi bits = (n + 127) << 23;
  vw scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// sc[0:n] = softmax(sc[0:n]) in place: max, e^(x - max) 16 lanes at a time, sum in a fixed order, divide.
inline void Softmax(float* sc, int64_t n) {
  float m = sc[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, sc[i]);
  vw acc[kA] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int a = 0; a < kA; ++a) {
      const vw e = Exp(Load(sc + i + kW * a) - m);
      Store(sc + i + kW * a, e);
      acc[a] += e;
    }
  if (i < n) {
    float tail[16];
    for (int j = 0; j < 16; ++j) tail[j] = i + j < n ? sc[i + j] - m : -87.0f;
    for (int a = 0; a < kA; ++a) Store(tail + kW * a, Exp(Load(tail + kW * a)));
    for (int64_t j = i; j < n; ++j) sc[j] = tail[j - i];
    for (int j = static_cast<int>(n - i); j < 16; ++j) tail[j] = 0.f;
    for (int a = 0; a < kA; ++a) acc[a] += Load(tail + kW * a);
  }
  const float inv = 1.f / HSum(acc);
  for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
}

struct Work {
  const float *q, *k, *v;
  const int32_t* pos;
  float* out;
  int64_t b, t, h, kv, s, hd, groups, units, chunks;
  float scale, softcap;
  int64_t window;
};

// One unit: row b, query t, kv head j -> the `groups` query heads that share it. hd = 16 * C (C > 0): each
// head's query and its weighted sum stay in vector registers while the keys stream past (the unit's K and V
// rows stay in L1/L2 between heads); C = 0: any hd, lane by lane.
template <int C>
void RunUnit(const Work& w, int64_t unit, std::vector<float>& scores) {
  const int64_t j = unit % w.kv, bt = unit / w.kv, b = bt / w.t;
  const int64_t hd = w.hd, g = w.groups;
  const int64_t p = w.pos[bt];
  float* out = w.out + (bt * w.h + j * g) * hd;
  const int64_t hi = std::min<int64_t>(p, w.s - 1);
  const int64_t lo = w.window > 0 ? std::max<int64_t>(0, p - w.window + 1) : 0;
  if (hi < lo) {  // no visible key (a position below 0): zeros
    std::memset(out, 0, g * hd * sizeof(float));
    return;
  }
  const int64_t n = hi - lo + 1;
  scores.resize(n);
  float* sc = scores.data();
  const int64_t row_stride = w.kv * hd;
  const float* k0 = w.k + (b * w.s * w.kv + j) * hd + lo * row_stride;
  const float* v0 = w.v + (b * w.s * w.kv + j) * hd + lo * row_stride;
  for (int64_t gi = 0; gi < g; ++gi) {
    const float* q = w.q + (bt * w.h + j * g + gi) * hd;
    float* o = out + gi * hd;
    if constexpr (C > 0) {
      vw qv[C * kA];
      for (int i = 0; i < C * kA; ++i) qv[i] = Load(q + kW * i);
      for (int64_t i = 0; i < n; ++i) {
        const float* kr = k0 + i * row_stride;
        vw acc[kA];
        for (int a = 0; a < kA; ++a) acc[a] = qv[a] * Load(kr + kW * a);
        for (int c = 1; c < C; ++c)
          for (int a = 0; a < kA; ++a) acc[a] += qv[c * kA + a] * Load(kr + 16 * c + kW * a);
        sc[i] = HSum(acc) * w.scale;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float* kr = k0 + i * row_stride;
        float acc = 0.f;
        for (int64_t d = 0; d < hd; ++d) acc += q[d] * kr[d];
        sc[i] = acc * w.scale;
      }
    }
    if (w.softcap > 0.f)
      for (int64_t i = 0; i < n; ++i) sc[i] = w.softcap * std::tanh(sc[i] / w.softcap);
    Softmax(sc, n);
    if constexpr (C > 0) {
      vw acc[C * kA];
      for (int c = 0; c < C * kA; ++c) acc[c] = vw{};
      for (int64_t i = 0; i < n; ++i) {
        const float* vr = v0 + i * row_stride;
        const float pi = sc[i];
        for (int c = 0; c < C * kA; ++c) acc[c] += pi * Load(vr + kW * c);
      }
      for (int c = 0; c < C * kA; ++c) Store(o + kW * c, acc[c]);
    } else {
      std::memset(o, 0, hd * sizeof(float));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < hd; ++d) o[d] += sc[i] * v0[i * row_stride + d];
    }
  }
}

void RunUnitAnyHd(const Work& w, int64_t unit, std::vector<float>& scores) {
  switch (w.hd) {
    case 64: return RunUnit<4>(w, unit, scores);
    case 128: return RunUnit<8>(w, unit, scores);
    case 256: return RunUnit<16>(w, unit, scores);
    default: return RunUnit<0>(w, unit, scores);
  }
}

void RunChunk(const Work& w, int64_t c) {
  std::vector<float> scores;
  const int64_t u0 = c * w.units / w.chunks, u1 = (c + 1) * w.units / w.chunks;
  for (int64_t u = u0; u < u1; ++u) RunUnitAnyHd(w, u, scores);
}

// Below this many multiply-adds (scores and weighted sums) a call runs on the calling thread alone: handing
// work to the pool costs more than it saves.
constexpr int64_t kParallelMin = 1 << 17;

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out,
                         float scale, float softcap, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = pos.dimensions(),
             od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || od.size() != 4)
    return ffi::Error::InvalidArgument("llmqp_attention_f32: q, k, v, out must be rank 4 and pos rank 2");
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("llmqp_attention_f32: k and v shapes differ");
    if (qd[i] != od[i]) return ffi::Error::InvalidArgument("llmqp_attention_f32: q and out shapes differ");
  }
  const int64_t b = qd[0], t = qd[1], h = qd[2], hd = qd[3], s = kd[1], kv = kd[2];
  if (kd[0] != b || kd[3] != hd || pd[0] != b || pd[1] != t || kv == 0 || h % kv != 0)
    return ffi::Error::InvalidArgument("llmqp_attention_f32: inconsistent shapes");
  if (b * t * h * hd == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->pos = pos.typed_data();
  work->out = out->typed_data();
  work->b = b;
  work->t = t;
  work->h = h;
  work->kv = kv;
  work->s = s;
  work->hd = hd;
  work->groups = h / kv;
  work->units = b * t * kv;
  work->scale = scale;
  work->softcap = softcap;
  work->window = window;
  int64_t keys = 0;
  for (int64_t i = 0; i < b * t; ++i) {
    const int64_t p = work->pos[i];
    keys += std::max<int64_t>(0, std::min<int64_t>(p, s - 1) + 1 -
                                     (window > 0 ? std::max<int64_t>(0, p - window + 1) : 0));
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool parallel = threads > 1 && work->units > 1 && keys * h * hd * 2 >= kParallelMin;
  work->chunks = parallel ? std::min<int64_t>(work->units, 4 * threads) : 1;
  llmqp::ParallelChunks(pool, work->chunks, parallel ? threads : 1, [work](int64_t c) { RunChunk(*work, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmqpAttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));
