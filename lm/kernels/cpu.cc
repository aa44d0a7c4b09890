// XLA FFI custom calls for XLA:CPU, float32: causal flash attention (forward and backward)
// and a 2-D transpose.
//
// Attention: XLA:CPU runs the attention's batched [64 x head_dim] products single-threaded at
// 40-60 GFLOP/s and every softmax step as a separate fusion through memory. Here each
// (batch, head) pair is one work item, spread over XLA's intra-op thread pool; within an
// item the products are register-tiled loops over cache-resident 64-row blocks and the
// softmax is fused between them (FlashAttention: online softmax forward; backward
// recomputes the probabilities from the saved log-sum-exp). q and k arrive already rotated
// (the model applies the rotary embedding in JAX, on every backend alike).
//
// Layout: q, k, v, o, do and the gradients dq, dk, dv are [batch, length, heads, head_dim]
// (any row stride is read through Slice); lse is [batch, heads, length].
//
// Transpose: XLA:CPU fuses a transpose with its producer (the layer scan's slice of a saved
// activation, say) into an elementwise loop that runs at 0.5-4 GB/s; the weight gradients of
// the dense layers each need one. Here it moves whole vectors, transposing W x W blocks in
// registers.
//
// Built by lm/kernels/cpu.py with the host's vector width.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int BLK = 64;  // rows of a query or key block; a multiple of every W

typedef float vec __attribute__((vector_size(W * 4)));
typedef float uvec __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(W * 4)));

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
inline vec splat(float x) { return vec{} + x; }

// exp on a vector (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2]).
// Inputs are clamped to [-87, 88], so exp(-inf) gives ~1e-38 rather than 0: callers that
// need exact zeros (masked entries) write them explicitly.
inline vec vexp(vec x) {
  x = x < splat(88.f) ? x : splat(88.f);
  x = x > splat(-87.f) ? x : splat(-87.f);
  const vec magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vec n = (x * splat(1.44269504088896341f) + magic) - magic;
  vec r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// C[M x N] (+)= op(A) B with op(A) = A [M x K] (row stride lda) or, with TRANS_A, the
// transpose of A stored [K x M]. B is [K x N], N a multiple of W, M a multiple of RT.
// A register tile is RT rows by NV <= 2 vectors, loaded and stored once: 8 x 2 ran at
// 90-105 GFLOP/s on one AVX-512 core for 64 x 64 x 32 products, 4 x 4 at 60.
constexpr int RT = 8;

template <int NV, bool ACC, bool TRANS_A>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t K) {
  vec acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load(C + r * ldc + v * W) : vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * W);
    for (int r = 0; r < RT; ++r) {
      vec a = splat(TRANS_A ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, acc[r][v]);
}

// Which part of a product on a diagonal block (keys and queries at the same positions) can
// be nonzero; the products skip the rest. Skipped output entries of a non-accumulating
// product are left unwritten (the caller masks them), and skipped terms of an accumulating
// one are those multiplying exact zeros (masked probabilities), so no value changes.
enum class Causal {
  kAll,                  // not a diagonal block
  kRowsNotAfterColumns,  // C [key, query]: tiles whose keys all follow their queries skipped
  kInnerUpToRow,         // C [query, .] = sum over keys: keys after the tile's queries skipped
  kInnerFromRow,         // C [key, .] = sum over queries: queries before the tile's keys skipped
};

template <int NV, bool ACC, bool TRANS_A>
inline void tile_rows(int64_t M, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, int64_t K, Causal causal, int64_t n) {
  for (int64_t m = 0; m < M; m += RT) {
    if (causal == Causal::kRowsNotAfterColumns && m >= n + NV * W) break;
    const int64_t k0 = causal == Causal::kInnerFromRow ? m : 0,
                  k1 = causal == Causal::kInnerUpToRow ? std::min(K, m + RT) : K;
    tile<NV, ACC, TRANS_A>(TRANS_A ? A + k0 * lda + m : A + m * lda + k0, lda, B + k0 * ldb, ldb,
                           C + m * ldc, ldc, k1 - k0);
  }
}

template <bool ACC, bool TRANS_A = false>
void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
            int64_t ldb, float* C, int64_t ldc, Causal causal = Causal::kAll) {
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W)
    tile_rows<2, ACC, TRANS_A>(M, A, lda, B + n, ldb, C + n, ldc, K, causal, n);
  for (; n < N; n += W) tile_rows<1, ACC, TRANS_A>(M, A, lda, B + n, ldb, C + n, ldc, K, causal, n);
}

// Column indices 0..W-1 of a vector, for the causal mask of diagonal blocks.
inline vec lane_index() {
  vec v;
  for (int i = 0; i < W; ++i) v[i] = float(i);
  return v;
}

// Shape of one call and the zero-padded sizes of its per-item buffers.
struct Dims {
  int64_t B, T, H, D, Tp, Dp;
  explicit Dims(ffi::Span<const int64_t> q)  // [B, T, H, D]
      : B(q[0]), T(q[1]), H(q[2]), D(q[3]), Tp((q[1] + BLK - 1) / BLK * BLK),
        Dp((q[3] + W - 1) / W * W) {}
  // offset of x[b, t, h, 0] in a [B, T, H, D] array
  int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * D; }
  int64_t row() const { return H * D; }  // distance between positions t and t + 1
};

// One (batch, head) slice [T x D] of a strided array: row t starts at base + t * stride.
struct Slice {
  const float* base;
  int64_t stride;
  const float* row(int64_t t) const { return base + t * stride; }
};

// A slice into rows [Tp x Dp] and/or, times cols_scale, transposed into cols [Dp x Tp]
// (either may be null), zero padded; one pass over the strided input for both.
void pack(Slice x, const Dims& d, float* rows, float* cols, float cols_scale = 1.f) {
  const bool padded = d.Tp != d.T || d.Dp != d.D;
  for (float* out : {rows, cols})
    if (out && padded) std::fill(out, out + d.Tp * d.Dp, 0.f);
  for (int64_t t = 0; t < d.T; ++t) {
    const float* row = x.row(t);
    if (rows) std::copy(row, row + d.D, rows + t * d.Dp);
    if (cols)
      for (int64_t c = 0; c < d.D; ++c) cols[c * d.Tp + t] = cols_scale * row[c];
  }
}

// Uninitialised scratch: every buffer is packed, zeroed or fully written before it is read.
std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }

// Runs f(0..n-1) on the caller and the pool's other threads; items are claimed from a
// shared counter, so a busy pool thread only means the caller does more of them.
void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::function<void(int64_t)> f;
    int64_t n;
  };
  auto state = std::make_shared<State>();
  state->f = f;
  state->n = n;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      s.f(i);
      s.done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->done.load() < n) std::this_thread::yield();
}

// The (batch, head) slice of a [B, T, H, D] array.
Slice slice(const float* x, const Dims& d, int64_t b, int64_t h) { return {x + d.at(b, 0, h), d.row()}; }

void forward_item(const Dims& d, const float* q, const float* k, const float* v, float* o,
                  float* lse, int64_t item) {
  // Key-major blocks [key, query], so that each query's softmax statistics are one lane of
  // a vector and every reduction runs down the rows (no horizontal sums, no scalar exp).
  const int64_t b = item / d.H, h = item % d.H, Tp = d.Tp, Dp = d.Dp;
  auto buf = scratch(3 * Tp * Dp + BLK * Dp + BLK * BLK);
  float *qt = buf.get(), *kp = qt + Tp * Dp, *vp = kp + Tp * Dp, *acc = vp + Tp * Dp,
        *st = acc + BLK * Dp;
  pack(slice(q, d, b, h), d, nullptr, qt, 1.f / std::sqrt(float(d.D)));
  pack(slice(k, d, b, h), d, kp, nullptr);
  pack(slice(v, d, b, h), d, vp, nullptr);
  const vec inf = splat(std::numeric_limits<float>::infinity()), lanes = lane_index();
  alignas(64) float m[BLK], l[BLK], alpha[BLK];
  for (int64_t qb = 0; qb < Tp; qb += BLK) {
    std::fill(acc, acc + BLK * Dp, 0.f);
    std::fill(m, m + BLK, -std::numeric_limits<float>::infinity());
    std::fill(l, l + BLK, 0.f);
    for (int64_t kb = 0; kb <= qb; kb += BLK) {
      const bool diagonal = kb == qb;
      matmul<false>(BLK, BLK, Dp, kp + kb * Dp, Dp, qt + qb, Tp, st, BLK,
                    diagonal ? Causal::kRowsNotAfterColumns : Causal::kAll);
      for (int c = 0; c < BLK; c += W) {  // queries qb + c .. qb + c + W - 1
        if (diagonal)  // key r is after query c + i when r > c + i (skipped tiles included)
          for (int r = c + 1; r < BLK; ++r)
            store(st + r * BLK + c, splat(float(r)) > lanes + float(c) ? -inf : load(st + r * BLK + c));
        vec mx = load(m + c);
        for (int r = 0; r < BLK; ++r) mx = mx > load(st + r * BLK + c) ? mx : load(st + r * BLK + c);
        vec sum{};
        for (int r = 0; r < BLK; ++r) {
          vec x = load(st + r * BLK + c), p = vexp(x - mx);
          p = x == -inf ? vec{} : p;  // exact zeros for masked keys
          store(st + r * BLK + c, p);
          sum += p;
        }
        vec a = vexp(load(m + c) - mx);  // ~0 on the first block (m = -inf, l = 0)
        store(alpha + c, a);
        store(l + c, load(l + c) * a + sum);
        store(m + c, mx);
      }
      for (int r = 0; r < BLK; ++r)
        for (int64_t c = 0; c < Dp; c += W) store(acc + r * Dp + c, load(acc + r * Dp + c) * alpha[r]);
      matmul<true, true>(BLK, Dp, BLK, st, BLK, vp + kb * Dp, Dp, acc, Dp,
                         diagonal ? Causal::kInnerUpToRow : Causal::kAll);
    }
    for (int r = 0; r < BLK && qb + r < d.T; ++r) {
      float* out = o + d.at(b, qb + r, h);
      for (int c = 0; c < d.D; ++c) out[c] = acc[r * Dp + c] / l[r];
      lse[(b * d.H + h) * d.T + qb + r] = m[r] + std::log(l[r]);
    }
  }
}

void backward_item(const Dims& d, const float* q, const float* k, const float* v, const float* o,
                   const float* lse, const float* g, float* dq, float* dk, float* dv,
                   int64_t item) {
  const int64_t b = item / d.H, h = item % d.H, Tp = d.Tp, Dp = d.Dp;
  const float scale = 1.f / std::sqrt(float(d.D));
  auto buf = scratch(7 * Tp * Dp + 2 * BLK * Dp + 4 * BLK * BLK + 2 * Tp);
  float *qp = buf.get(), *qt = qp + Tp * Dp, *kp = qt + Tp * Dp, *vp = kp + Tp * Dp,
        *gp = vp + Tp * Dp, *gt = gp + Tp * Dp, *dqa = gt + Tp * Dp, *dka = dqa + Tp * Dp,
        *dva = dka + BLK * Dp, *st = dva + BLK * Dp, *pt = st + BLK * BLK,
        *dpt = pt + BLK * BLK, *dst = dpt + BLK * BLK, *lse_p = dst + BLK * BLK,
        *delta = lse_p + Tp;
  pack(slice(q, d, b, h), d, qp, qt, scale);
  pack(slice(k, d, b, h), d, kp, nullptr);
  pack(slice(v, d, b, h), d, vp, nullptr);
  pack(slice(g, d, b, h), d, gp, gt);
  std::fill(dqa, dqa + Tp * Dp, 0.f);
  for (int64_t t = 0; t < Tp; ++t) {  // padded queries: lse = +inf makes their P ~0
    lse_p[t] = t < d.T ? lse[(b * d.H + h) * d.T + t] : std::numeric_limits<float>::infinity();
    float acc = 0.f;
    if (t < d.T) {
      const float *gr = g + d.at(b, t, h), *orow = o + d.at(b, t, h);
      for (int64_t c = 0; c < d.D; ++c) acc += gr[c] * orow[c];
    }
    delta[t] = acc;
  }
  for (int64_t kb = 0; kb < Tp; kb += BLK) {
    std::fill(dka, dka + BLK * Dp, 0.f);
    std::fill(dva, dva + BLK * Dp, 0.f);
    for (int64_t qb = kb; qb < Tp; qb += BLK) {
      // key-major blocks [key, query]: st = k qᵀ (scaled), dpt = v doᵀ
      const bool diagonal = qb == kb;
      const Causal scores = diagonal ? Causal::kRowsNotAfterColumns : Causal::kAll;
      matmul<false>(BLK, BLK, Dp, kp + kb * Dp, Dp, qt + qb, Tp, st, BLK, scores);
      matmul<false>(BLK, BLK, Dp, vp + kb * Dp, Dp, gt + qb, Tp, dpt, BLK, scores);
      const vec lanes = lane_index();
      for (int r = 0; r < BLK; ++r) {
        for (int c = 0; c < BLK; c += W) {
          vec p = vexp(load(st + r * BLK + c) - load(lse_p + qb + c)),
              ds = p * (load(dpt + r * BLK + c) - load(delta + qb + c));
          if (diagonal) {  // query c + i sees key r only when c + i >= r (skipped tiles too)
            const auto hidden = lanes + float(c) < float(r);
            p = hidden ? vec{} : p;
            ds = hidden ? vec{} : ds;
          }
          store(pt + r * BLK + c, p);
          store(dst + r * BLK + c, ds);
        }
      }
      const Causal by_key = diagonal ? Causal::kInnerFromRow : Causal::kAll;
      matmul<true>(BLK, Dp, BLK, pt, BLK, gp + qb * Dp, Dp, dva, Dp, by_key);
      matmul<true>(BLK, Dp, BLK, dst, BLK, qp + qb * Dp, Dp, dka, Dp, by_key);
      matmul<true, true>(BLK, Dp, BLK, dst, BLK, kp + kb * Dp, Dp, dqa + qb * Dp, Dp,
                         diagonal ? Causal::kInnerUpToRow : Causal::kAll);
    }
    for (int r = 0; r < BLK && kb + r < d.T; ++r) {
      const int64_t at = d.at(b, kb + r, h);
      for (int64_t c = 0; c < d.D; ++c) dk[at + c] = scale * dka[r * Dp + c];
      std::copy(dva + r * Dp, dva + r * Dp + d.D, dv + at);
    }
  }
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t c = 0, at = d.at(b, t, h); c < d.D; ++c) dq[at + c] = scale * dqa[t * Dp + c];
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32Out o, F32Out lse) {
  Dims d(q.dimensions());
  parallel_for(pool, d.B * d.H, [&](int64_t i) {
    forward_item(d, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(),
                 lse->typed_data(), i);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32 o, F32 lse, F32 g,
                    F32Out dq, F32Out dk, F32Out dv) {
  Dims d(q.dimensions());
  parallel_for(pool, d.B * d.H, [&](int64_t i) {
    backward_item(d, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(),
                  lse.typed_data(), g.typed_data(), dq->typed_data(), dk->typed_data(),
                  dv->typed_data(), i);
  });
  return ffi::Error::Success();
}

// Lane l of the first (second) output of stage K of the in-register transpose: stage K
// swaps the off-diagonal K x K sub-blocks of every 2K x 2K block, between a row i (i & K = 0)
// and row i + K. Indices below W pick from a, from W on from b.
constexpr int stage_lane(int K, int l, bool second) {
  return second ? ((l & K) ? W + l : l + K) : ((l & K) ? W + l - K : l);
}

// Lanes of a and b picked by constant indices: clang's builtin, also in GCC since 12; older
// GCC (11 is Ubuntu 22.04's) has its own with a mask vector.
#if defined(__clang__) || __GNUC__ >= 12
#define LM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, ivec{__VA_ARGS__})
#endif

template <int K, int... L>
inline void stage(vec* v, std::integer_sequence<int, L...>) {
  for (int i = 0; i < W; ++i)
    if (!(i & K)) {
      const vec a = v[i], b = v[i + K];
      v[i] = LM_SHUFFLE(a, b, stage_lane(K, L, false)...);
      v[i + K] = LM_SHUFFLE(a, b, stage_lane(K, L, true)...);
    }
}

template <int K = W / 2>
inline void transpose_registers(vec* v) {  // W vectors: rows -> columns
  stage<K>(v, std::make_integer_sequence<int, W>{});
  if constexpr (K > 1) transpose_registers<K / 2>(v);
}

// out[j, i] = x[i, j] for a 2-D x: W x W blocks transposed in registers (whole-vector loads
// and stores), bands of BLK rows in parallel, so that each output row gets BLK contiguous
// values per band; the ragged right and bottom edges element by element.
ffi::Error Transpose(ffi::ThreadPool pool, F32 x, F32Out out) {
  const int64_t rows = x.dimensions()[0], cols = x.dimensions()[1];
  const int64_t full_rows = rows / W * W, full_cols = cols / W * W;
  const float* in = x.typed_data();
  float* o = out->typed_data();
  parallel_for(pool, (rows + BLK - 1) / BLK, [&](int64_t band) {
    const int64_t r0 = band * BLK, r1 = std::min(rows, r0 + BLK), full_r1 = std::min(full_rows, r1);
    for (int64_t c0 = 0; c0 < full_cols; c0 += W)
      for (int64_t r = r0; r < full_r1; r += W) {
        vec v[W];
        for (int i = 0; i < W; ++i) v[i] = load(in + (r + i) * cols + c0);
        transpose_registers(v);
        for (int j = 0; j < W; ++j) store(o + (c0 + j) * rows + r, v[j]);
      }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) o[c * rows + r] = in[r * cols + c];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTranspose, Transpose,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
