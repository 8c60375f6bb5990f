// One decoding step of the transformer in transformer.py, on the CPU in float32: every
// row of the batch gets one new token; its keys and values go into the KV cache and the
// logits of the next token come out. `native.py` builds this file with the machine's C++
// compiler and calls it once a step, in place of ~100 PyTorch operations.
//
// Why it exists: at batch 1 a step of the 4M-parameter default model is ~200 microseconds
// of work, and PyTorch spends several times that on dispatching its operations and on
// matrix products that stream the weights below the speed of this memory. Here the whole
// step runs inside one OpenMP parallel region (in the OpenMP runtime PyTorch has loaded,
// so the threads are PyTorch's), each weight matrix is read once per step for all rows,
// and the weights are read where they are, in nn.Linear's (out, in) layout: no copies.
//
// Each dot product is summed in one fixed order, whatever the batch's size or the number
// of threads. Shapes: B rows, C model dim, H query heads, K key/value heads, D head dim,
// F feed-forward dim, V vocabulary, S keys (cached + the new one).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

// A vector: the widest registers the build targets (-march=native): 16 floats with AVX-512,
// 8 with AVX, 4 otherwise (SSE, NEON).
#if defined(__AVX512F__)
constexpr int LANES = 16;
#elif defined(__AVX__)
constexpr int LANES = 8;
#else
constexpr int LANES = 4;
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef float vec_unaligned __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int lanes __attribute__((vector_size(4 * LANES)));

static inline vec load(const float* p) { return *(const vec_unaligned*)p; }
static inline void store(float* p, vec v) { *(vec_unaligned*)p = v; }

extern "C" {

struct Layer {
  const float *input_norm, *q, *k, *v, *q_bias, *k_bias, *v_bias, *o;  // biases may be null
  const float *post_attention_norm, *gate, *up, *down;
};

struct Model {
  int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_positions;
  float norm_eps;
  const float *embed, *final_norm, *lm_head;  // (V, C) both
  const float *rope_cos, *rope_sin;           // (max_seq_len, D)
  const Layer* layers;
};

}  // extern "C"

// Lane j of the vector that folds two vectors of groups of 2G lanes into one of groups of G:
// the first half of its group (from a for the first half of the lanes, then from b, whose
// lanes the shuffle numbers from LANES on).
constexpr int first_half(int G, int j) {
  return (j % (LANES / 2)) / G * 2 * G + j % G + (j >= LANES / 2) * LANES;
}

// Lane by lane, the sums of the first and second halves of a's and b's groups of 2G lanes.
template <int G, int... J>
__attribute__((always_inline)) static inline vec fold(vec a, vec b,
                                                      std::integer_sequence<int, J...>) {
  return __builtin_shuffle(a, b, (lanes){first_half(G, J)...}) +
         __builtin_shuffle(a, b, (lanes){(first_half(G, J) + G)...});
}

// r: 2G vectors of groups of 2G lanes -> one vector, each lane the sum of one group
template <int G>
__attribute__((always_inline)) static inline vec fold_all(vec* r) {
  for (int i = 0; i < G; ++i)
    r[i] = fold<G>(r[2 * i], r[2 * i + 1], std::make_integer_sequence<int, LANES>{});
  if constexpr (G == 1)
    return r[0];
  else
    return fold_all<G / 2>(r);
}

// The sums of the lanes of a[0 .. LANES-1], in one vector (a[i]'s sum in lane i): with 16
// lanes, 15 folds of two vectors (45 operations where summing each vector alone takes 128).
__attribute__((always_inline)) static inline vec sum_each(const vec* a) {
  vec r[LANES];
  for (int i = 0; i < LANES; ++i) r[i] = a[i];
  return fold_all<LANES / 2>(r);
}

// Keeps v in a register. Without it GCC folds the loads of weights into the multiply-adds
// as memory operands, loading each vector of weights once per row of a tile (1.6x slower).
// Only x86 has such operands; elsewhere this is nothing.
static inline void in_register(vec& v) {
#if defined(__SSE__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Prefetches `lines` cache lines from `at`, spread evenly over `steps` (>= 1) calls of
// step().
struct Prefetcher {
  const char* at;
  int lines, steps, owed = 0;
  inline void step() {
    for (owed += lines; owed >= steps; owed -= steps, at += 64) __builtin_prefetch(at);
  }
};

// y[m, n] = x[m] . w[n] for the MR rows from m0 and the NR weight rows from n0 (MR * NR <=
// LANES dot products, K a multiple of LANES): each vector of weights loaded serves MR rows.
// Every step of k also takes a step of `ahead`, whose lines arrive while the tile computes.
template <int MR, int NR>
__attribute__((always_inline)) static inline void tile(const float* x, const float* w, float* y,
                                                       int m0, int n0, int K, int N, bool add,
                                                       Prefetcher& ahead) {
  static_assert(MR * NR <= LANES, "one accumulator per lane of the sums");
  vec acc[LANES] = {};
  for (int k = 0; k < K; k += LANES) {
    ahead.step();
    vec wk[NR];
    for (int j = 0; j < NR; ++j) {
      wk[j] = load(w + (int64_t)(n0 + j) * K + k);
      if constexpr (MR > 1) in_register(wk[j]);
    }
    for (int i = 0; i < MR; ++i) {
      vec xi = load(x + (int64_t)(m0 + i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += xi * wk[j];
    }
  }
  vec sums = sum_each(acc);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float* out = y + (int64_t)(m0 + i) * N + n0 + j;
      *out = add ? *out + sums[i * NR + j] : sums[i * NR + j];
    }
}

// y[:, n0:n0 + NR] for all M rows: the NR weight rows come into cache with the first tile
// and serve the others from there. Meanwhile the tiles prefetch the weight rows that follow
// (up to NR, before n1), spread over their steps, so that those arrive while these are
// reused: 1.4x faster at batch 16, where the hardware prefetcher alone sees bursts of
// misses between long stretches of hits. A single row reuses nothing and streams the
// weights at a steady pace, which the hardware prefetcher serves better alone.
template <int NR>
static void weight_rows(const float* x, const float* w, float* y, int M, int n0, int n1, int K,
                        int N, bool add) {
  constexpr int MR = LANES / NR;
  const int next_rows = M > 1 ? std::max(0, std::min(NR, n1 - n0 - NR)) : 0;
  const uintptr_t first = (uintptr_t)(w + (int64_t)(n0 + NR) * K);
  const uintptr_t end = first + (uintptr_t)next_rows * K * sizeof(float);
  const int lines = next_rows ? (int)((end - 1) / 64 - first / 64 + 1) : 0;
  Prefetcher ahead{(const char*)(first / 64 * 64), lines,
                   (M / MR + M % MR) * (K / LANES)};  // steps: those of all the tiles
  int m = 0;
  for (; m + MR <= M; m += MR) tile<MR, NR>(x, w, y, m, n0, K, N, add, ahead);
  for (; m < M; ++m) tile<1, NR>(x, w, y, m, n0, K, N, add, ahead);
}

// This thread's share [n0, n1) of N outputs, in whole blocks of LANES (the last thread also
// takes what is left over): the same for every product of N outputs.
static inline void columns(int N, int* n0, int* n1) {
  int threads = omp_get_num_threads(), t = omp_get_thread_num();
  *n0 = N / LANES * t / threads * LANES;
  *n1 = t == threads - 1 ? N : N / LANES * (t + 1) / threads * LANES;
}

// y[:, n0:n1] = x (M, K) @ w[n0:n1] (w (N, K) in nn.Linear's layout), or y += that with
// `add` (the residual stream), on the calling thread alone.
static void rows_of(const float* x, const float* w, float* y, int M, int K, int N, int n0,
                    int n1, bool add) {
  int n = n0;
  if (K % LANES == 0) {
    // tiles of LANES dot products (1 row x LANES weight rows, or 2 x LANES / 2), then smaller
    // ones for what is left; every dot product is summed in the same order whatever its
    // tile, so that a row's result depends neither on the batch's size nor on the threads
    if (M == 1)
      for (; n + LANES <= n1; n += LANES) weight_rows<LANES>(x, w, y, M, n, n1, K, N, add);
    for (; n + LANES / 2 <= n1; n += LANES / 2)
      weight_rows<LANES / 2>(x, w, y, M, n, n1, K, N, add);
    for (; n + 2 <= n1; n += 2) weight_rows<2>(x, w, y, M, n, n1, K, N, add);
    for (; n < n1; ++n) weight_rows<1>(x, w, y, M, n, n1, K, N, add);
    return;
  }
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += x[(int64_t)m * K + k] * w[(int64_t)n * K + k];
      float* out = y + (int64_t)m * N + n;
      *out = add ? *out + s : s;
    }
}

// rows_of for this thread's share of the N outputs (`columns`); no barrier.
static void product(const float* x, const float* w, float* y, int M, int K, int N,
                    bool add = false) {
  int n0, n1;
  columns(N, &n0, &n1);
  rows_of(x, w, y, M, K, N, n0, n1, add);
}

// This thread's share [begin, end) of n units of work.
static inline void share(int n, int* begin, int* end) {
  int threads = omp_get_num_threads(), t = omp_get_thread_num();
  *begin = n * t / threads;
  *end = n * (t + 1) / threads;
}

// out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * weight, rows shared among threads
static void rms_norm(const float* x, const float* weight, float* out, int B, int C, float eps) {
  int b0, b1;
  share(B, &b0, &b1);
  for (int b = b0; b < b1; ++b) {
    const float* xb = x + (int64_t)b * C;
    float ss = 0.f;
    for (int c = 0; c < C; ++c) ss += xb[c] * xb[c];
    float inv = 1.f / std::sqrt(ss / C + eps);
    for (int c = 0; c < C; ++c) out[(int64_t)b * C + c] = weight[c] * (xb[c] * inv);
  }
}

// Rotate one head's vector x (D) in place at the angles of one position ("rotate half").
static inline void rope(float* x, const float* cos, const float* sin, int D) {
  int half = D / 2;
  for (int i = 0; i < half; ++i) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// e^x lane by lane (Cephes' expf: 2^n e^r with |r| <= ln(2) / 2, r's exponential by a
// polynomial; relative error ~1e-7); 0 below -87, where float32's e^x ends, and for -inf
static inline vec exp_lanes(vec x) {
  vec kept = x < -87.f ? (vec){} - 87.f : x;
  kept = kept > 88.f ? (vec){} + 88.f : kept;
  vec n = kept * 1.44269504088896341f + 12582912.f;  // round(x / ln 2): 1.5 * 2^23 shifts
  n -= 12582912.f;                                    // the fraction out
  vec r = kept - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  lanes exponent = (__builtin_convertvector(n, lanes) + 127) << 23;
  vec y = p * (vec)exponent;
  return x < -87.f ? (vec){} : y;
}

static inline float sum_lanes(vec a) {
  vec all[LANES] = {a};
  return sum_each(all)[0];
}

// gate[m, n] = silu(gate[m, n]) * up[m, n] for this thread's share of the N columns (the
// share its products wrote: no barrier), through exp_lanes however the share falls
static void silu_times(float* gate, const float* up, int M, int N) {
  int n0, n1;
  columns(N, &n0, &n1);
  for (int m = 0; m < M; ++m)
    for (int n = n0; n < n1; n += LANES) {
      int width = n1 - n < LANES ? n1 - n : LANES;
      float* g_row = gate + (int64_t)m * N + n;
      const float* u_row = up + (int64_t)m * N + n;
      vec g = {}, u = {};
      for (int j = 0; j < width; ++j) g[j] = g_row[j], u[j] = u_row[j];
      vec y = g / (1.f + exp_lanes(-g)) * u;
      for (int j = 0; j < width; ++j) g_row[j] = y[j];
    }
}

// out[g][i:i + LANES] = sum_s e[g][s] * values[s][i:i + LANES] * inv_total[g] for G heads'
// exponentials e (head g's at g * stride) of S keys; the values of a key are loaded once for
// the G heads. Each head sums its even and its odd keys apart (so that adds overlap), then
// adds the two: the same order whatever G.
template <int G>
static inline void weigh_values(const float* e, int64_t stride, const float* inv_total,
                                const float* values, int S, int D, int i, float* out) {
  vec even[G] = {}, odd[G] = {};
  int s = 0;
  for (; s + 1 < S; s += 2) {
    vec v0 = load(values + (int64_t)s * D + i), v1 = load(values + (int64_t)(s + 1) * D + i);
    for (int g = 0; g < G; ++g) {
      even[g] += e[g * stride + s] * v0;
      odd[g] += e[g * stride + s + 1] * v1;
    }
  }
  if (s < S) {
    vec v0 = load(values + (int64_t)s * D + i);
    for (int g = 0; g < G; ++g) even[g] += e[g * stride + s] * v0;
  }
  for (int g = 0; g < G; ++g) store(out + g * D + i, (even[g] + odd[g]) * inv_total[g]);
}

// The attention of the `group` query heads q (group, D) that share one key/value head:
// softmax(q[g] . keys / sqrt(D)) @ values for each, over keys and values (S, D) where real
// (S) is nonzero (null: all are), into out (group, D). scores: group * (S + LANES + 1)
// floats of scratch. The keys and values come from memory once for the group (and from
// cache for the products' further tiles of queries and for further chunks of heads). The
// query's own key is real, so no row is all -inf.
static void attend(const float* q, const float* keys, const float* values, const uint8_t* real,
                   int S, int D, int group, float* scores, float* out) {
  const int64_t stride = S + LANES;
  rows_of(q, keys, scores, group, D, stride, 0, S, false);  // the keys as a weight's rows
  float* inv_total = scores + group * stride;
  const float scale = 1.f / std::sqrt((float)D);
  for (int g = 0; g < group; ++g) {
    float* p = scores + (int64_t)g * stride;
    float top = -INFINITY;
    int s = 0;
    for (; s < S; ++s) {
      p[s] = (real && !real[s]) ? -INFINITY : p[s] * scale;
      top = p[s] > top ? p[s] : top;
    }
    for (; s % LANES; ++s) p[s] = -INFINITY;
    vec total = {};
    for (s = 0; s < S; s += LANES) {
      vec e = exp_lanes(load(p + s) - top);
      store(p + s, e);
      total += e;
    }
    inv_total[g] = 1.f / sum_lanes(total);
  }
  int i = 0;
  if (D % LANES == 0)
    for (; i < D; i += LANES) {
      int g = 0;
      for (; g + 4 <= group; g += 4)
        weigh_values<4>(scores + g * stride, stride, inv_total + g, values, S, D, i, out + g * D);
      for (; g + 2 <= group; g += 2)
        weigh_values<2>(scores + g * stride, stride, inv_total + g, values, S, D, i, out + g * D);
      for (; g < group; ++g)
        weigh_values<1>(scores + g * stride, stride, inv_total + g, values, S, D, i, out + g * D);
    }
  for (; i < D; ++i)
    for (int g = 0; g < group; ++g) {
      float sum = 0.f;
      for (int s = 0; s < S; ++s) sum += scores[g * stride + s] * values[(int64_t)s * D + i];
      out[g * D + i] = sum * inv_total[g];
    }
}

extern "C" {

// The sizes of the structs as compiled, which native.py checks against its own ctypes
// layout before it trusts the library with a pointer.
void lmforge_struct_sizes(int64_t* model, int64_t* layer) {
  *model = sizeof(Model);
  *layer = sizeof(Layer);
}

// Floats of scratch memory a step needs for B rows and up to S keys.
int64_t lmforge_workspace_floats(const Model* m, int B, int S) {
  int64_t C = m->dim, QD = (int64_t)m->n_heads * m->head_dim;
  int64_t KD = (int64_t)m->n_kv_heads * m->head_dim;
  int64_t group = m->n_heads / m->n_kv_heads;  // attend's scores and sums, per thread:
  int64_t scores = omp_get_max_threads() * group * (S + LANES + 1);
  return B * (2 * C + QD + 2 * KD + QD + 2 * (int64_t)m->ffn_dim) + scores;
}

// tokens (B): each row's new token; positions (B): its rotary position; valid (B, S) with
// row stride valid_stride, nonzero where a key is a real token (null: all are); k_cache and
// v_cache (L, B, K, S_max, D) hold S - 1 positions and get the new one at S - 1; logits
// (B, V) out; work: lmforge_workspace_floats(m, B, S) floats. Returns 0; or, having
// computed nothing, 1 for a token outside the vocabulary, 2 for a position past the tables.
int lmforge_decode_step(const Model* m, int B, const int64_t* tokens, const int64_t* positions,
                         const uint8_t* valid, int64_t valid_stride, int S, float* k_cache,
                         float* v_cache, int64_t S_max, float* logits, float* work) {
  for (int b = 0; b < B; ++b) {
    if (tokens[b] < 0 || tokens[b] >= m->vocab) return 1;
    if (positions[b] < 0 || positions[b] >= m->max_positions) return 2;
  }
  const int C = m->dim, H = m->n_heads, K = m->n_kv_heads, D = m->head_dim, F = m->ffn_dim;
  const int QD = H * D, KD = K * D, group = H / K;
  float* x = work;             // (B, C) the residual stream
  float* h = x + B * C;        // (B, C) normalised
  float* q = h + B * C;        // (B, QD)
  float* k = q + B * QD;       // (B, KD)
  float* v = k + B * KD;       // (B, KD)
  float* att = v + B * KD;     // (B, QD) attention's output
  float* gate = att + B * QD;  // (B, F)
  float* up = gate + (int64_t)B * F;
  float* scores_all = up + (int64_t)B * F;  // (threads, group * (S + LANES + 1))

#pragma omp parallel num_threads(omp_get_max_threads())
  {
    float* scores = scores_all + (int64_t)omp_get_thread_num() * group * (S + LANES + 1);
    int b0, b1;
    share(B, &b0, &b1);
    for (int b = b0; b < b1; ++b)
      for (int c = 0; c < C; ++c) x[(int64_t)b * C + c] = m->embed[tokens[b] * C + c];
#pragma omp barrier
    for (int l = 0; l < m->n_layers; ++l) {
      const Layer& L = m->layers[l];
      rms_norm(x, L.input_norm, h, B, C, m->norm_eps);
#pragma omp barrier
      product(h, L.q, q, B, C, QD);
      product(h, L.k, k, B, C, KD);
      product(h, L.v, v, B, C, KD);
#pragma omp barrier
      // biases, rotary angles, and the new keys and values into the cache: (row, head) units
      int u0, u1;
      share(B * H, &u0, &u1);
      for (int u = u0; u < u1; ++u) {
        int b = u / H, head = u % H;
        const float* cos = m->rope_cos + positions[b] * D;
        const float* sin = m->rope_sin + positions[b] * D;
        float* qh = q + (int64_t)b * QD + head * D;
        if (L.q_bias)
          for (int i = 0; i < D; ++i) qh[i] += L.q_bias[head * D + i];
        rope(qh, cos, sin, D);
        if (head < K) {
          float* kh = k + (int64_t)b * KD + head * D;
          float* vh = v + (int64_t)b * KD + head * D;
          if (L.k_bias)
            for (int i = 0; i < D; ++i)
              kh[i] += L.k_bias[head * D + i], vh[i] += L.v_bias[head * D + i];
          rope(kh, cos, sin, D);
          int64_t at = (((int64_t)l * B + b) * K + head) * S_max + (S - 1);
          for (int i = 0; i < D; ++i) k_cache[at * D + i] = kh[i], v_cache[at * D + i] = vh[i];
        }
      }
#pragma omp barrier
      // attention of each row's query heads over its S keys, by (row, key/value head), the
      // group's heads in chunks where there are fewer groups than threads (a head's sums are
      // the same in any chunk)
      const int chunks = std::min(group, (omp_get_num_threads() + B * K - 1) / (B * K));
      share(B * K * chunks, &u0, &u1);
      for (int u = u0; u < u1; ++u) {
        int b = u / (K * chunks), kv_head = u / chunks % K, chunk = u % chunks;
        int first = group * chunk / chunks, last = group * (chunk + 1) / chunks;
        int64_t base = (((int64_t)l * B + b) * K + kv_head) * S_max * D;
        int64_t at = (int64_t)b * QD + (kv_head * group + first) * D;
        attend(q + at, k_cache + base, v_cache + base,
               valid ? valid + (int64_t)b * valid_stride : nullptr, S, D, last - first, scores,
               att + at);
      }
#pragma omp barrier
      product(att, L.o, x, B, QD, C, /*add=*/true);  // x += attention's output
#pragma omp barrier
      rms_norm(x, L.post_attention_norm, h, B, C, m->norm_eps);
#pragma omp barrier
      product(h, L.gate, gate, B, C, F);
      product(h, L.up, up, B, C, F);
      silu_times(gate, up, B, F);
#pragma omp barrier
      product(gate, L.down, x, B, F, C, /*add=*/true);  // x += the feed-forward's output
#pragma omp barrier
    }
    rms_norm(x, m->final_norm, h, B, C, m->norm_eps);
#pragma omp barrier
    product(h, m->lm_head, logits, B, C, m->vocab);
  }
  return 0;
}

}  // extern "C"
