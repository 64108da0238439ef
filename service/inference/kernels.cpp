// Quantized matrix products for x86 CPUs with AVX2 + FMA: float32 activations times int8 weights
// (one scale per output row) or 4-bit weights (a scale and a low per group of inputs), in exactly
// the stored form of service/inference/quantized.py's `quantize`, so nothing is repacked at load.
//
// Decoding a token is a product with one activation row per sequence (M <= 8), which reads every
// weight once: the pace is memory bandwidth, so the weights are read once and multiplied in
// integers with activation rows quantized to int8 (vpmaddubsw/vpmaddwd), rescaled in float. Rows of the output are split over PyTorch's
// own thread pool (at::parallel_for); within a block of rows, the activation rows are taken up to 4
// at a time while the block's weights stay in the core's cache, so larger M reads memory once too.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK_ROWS = 16;  // output rows per parallel task: 16 x K int8 bytes stay in L1/L2
constexpr int BATCH8_FROM = 3;     // activation rows from which int8 decode takes the batch tile (int8q_tile_batch2)

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// int8 weights as llama.cpp's Q8_0 x Q8_0: per block of 32 inputs, the weights (int8, one float16
// scale per row and block) times the activations quantized to int8 per row and block (symmetric,
// scale = max|x_block| / 127, rounded to nearest even), y = bias + sum over blocks of the block's
// integer dot x (weight scale x activation scale). One scale per whole row spent the int8 range on
// the few outlier channels real activations have (SmolLM2-135M, teacher-forced: KL to float32
// 0.037 per row, 0.0043 per block). Per 32 inputs |x| (unsigned) times w with x's sign
// (vpmaddubsw: pairs into int16, at most 2 x 127 x 127, so nothing saturates), pairs into int32
// (vpmaddwd), that block's 8 lanes to float and added times the two scales (one FMA): lane by lane,
// block after block, then the lanes summed, the same float steps in every tile, so a row's result
// does not depend on the rows computed with it.
inline int32_t hsum_i32(__m256i v) {
  __m128i lo = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0x4e));
  lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0xb1));
  return _mm_cvtsi128_si32(lo);
}

inline float hmax(__m256 v) {
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  return _mm_cvtss_f32(m4);
}

// Activation rows to int8, vectorized: a decode step calls ~200 products per token, and the scalar
// loop (a rounding, a clamp and for int4 a division per input) cost 10-80 us a call, 2-6 ms a token.
// Rounding as std::nearbyint (vcvtps2dq rounds to nearest even), scale = max|x_block| / 127.
// 32 inputs x inv rounded to int8, in their order; `sum` gets their int32 sum
inline __m256i quantize32(const float* p, __m256 inv, int32_t& sum) {
  __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p), inv));
  __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 8), inv));
  __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 16), inv));
  __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 24), inv));
  sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
  // packs work per 128-bit half: the dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7
  __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline int8_t quantize1(float v, float inv) {
  return static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(v * inv))));
}

// One row of K inputs to int8 per block of 32 (a last block of K % 32 when K is not a multiple):
// `dst` K values in order, `xs` ceil(K / 32) scales, max|x_block| / 127 (0 for an all-zero block,
// whose values are all 0).
inline void quantize_row_blocks(const float* row, int64_t K, int8_t* dst, float* xs) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int32_t unused;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const float* p = row + k;
    const __m256 m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p), magnitude), _mm256_and_ps(_mm256_loadu_ps(p + 8), magnitude)),
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p + 16), magnitude),
                      _mm256_and_ps(_mm256_loadu_ps(p + 24), magnitude)));
    const float scale = hmax(m) / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), quantize32(p, _mm256_set1_ps(inv), unused));
    xs[k / 32] = scale;
  }
  if (k < K) {
    float amax = 0.0f;
    for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(row[t]));
    const float scale = amax / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t t = k; t < K; ++t) dst[t] = quantize1(row[t], inv);
    xs[k / 32] = scale;
  }
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// a tile's last step, shared by every tile so that they round alike: the lanes summed, then the
// last short block (K % 32 inputs: an integer dot in scalar code, times its two scales)
template <int MB, int R>
inline void int8q_finish(const __m256 acc[MB][R], const int8_t* xq, const float* xs, int64_t K, int64_t nb,
                         const int8_t* w, const uint16_t* ws, float out[MB][R]) {
  const int64_t k = (K / 32) * 32;
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      if (k < K) {
        int32_t dot = 0;
        for (int64_t t = k; t < K; ++t) dot += static_cast<int32_t>(xq[m * K + t]) * w[r * K + t];
        const float d = half_to_float(ws[r * nb + nb - 1]) * xs[m * nb + nb - 1];
        s = s + static_cast<float>(dot) * d;
      }
      out[m][r] = s;
    }
}

// the scale products of R weight rows (`ws`, rows of nb) and MB activation rows (`xs`, rows of nb),
// [m][r][block], for the first `full` blocks: 8 blocks a multiply
template <int MB, int R>
inline void int8q_scales(const float* xs, const uint16_t* ws, int64_t nb, int64_t full, float* d) {
  for (int r = 0; r < R; ++r) {
    int64_t b = 0;
    for (; b + 8 <= full; b += 8) {
      const __m256 w8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + r * nb + b)));
      for (int m = 0; m < MB; ++m)
        _mm256_storeu_ps(d + (m * R + r) * nb + b, _mm256_mul_ps(w8, _mm256_loadu_ps(xs + m * nb + b)));
    }
    for (; b < full; ++b)
      for (int m = 0; m < MB; ++m) d[(m * R + r) * nb + b] = half_to_float(ws[r * nb + b]) * xs[m * nb + b];
  }
}

// `d`: room for MB x R x nb floats (the scale products, made once per tile)
template <int MB, int R>
inline void int8q_tile(const int8_t* xq, const float* xs, int64_t K, int64_t nb, const int8_t* w,
                       const uint16_t* ws, float* d, float out[MB][R]) {
  const __m256i ones = _mm256_set1_epi16(1);
  int8q_scales<MB, R>(xs, ws, nb, K / 32, d);
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t full = K / 32;
  for (int64_t b = 0; b < full; ++b) {
    const int64_t k = 32 * b;
    __m256i xv[MB], ax[MB];
    for (int m = 0; m < MB; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
      ax[m] = _mm256_sign_epi8(xv[m], xv[m]);
    }
    for (int r = 0; r < R; ++r) {
      // the rows two tiles ahead: the big matrices come from memory, not cache. Short rows (gate/up,
      // the head: 1,536 inputs) are prefetched as the one contiguous run the tile's rows make, line
      // after line (14 against 11 GB/s on a 2-core AVX2 EPYC); long ones (down) row by row (19 against 15)
      if (K <= 2048) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + 2 * R * K + ((k / 64) * R + r) * 64), _MM_HINT_T0);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * K + k), _MM_HINT_T0);
      }
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      for (int m = 0; m < MB; ++m) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wv, xv[m])), ones);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(d + (m * R + r) * nb + b), acc[m][r]);
      }
    }
  }
  int8q_finish<MB, R>(acc, xq, xs, K, nb, w, ws, out);
}

// 3-4 activation rows at once (a batch's decode step; from BATCH8_FROM: at 2 rows the 4-weight-row
// tile was as fast): there the products are compute-bound, not memory-bound, and int8q_tile<3..4, 2>
// spent about as many instructions again as its arithmetic on copying accumulators between
// registers, a spilled one, reloading row pointers and |x| for every pair of weight rows. For the
// batch tile the rows are packed once per product, per 32 inputs [x_0 | |x_0| | x_1 | |x_1| ...]
// (64 x MB bytes a step), so one pointer with constant offsets walks them; the arithmetic is
// int8q_tile's exactly (per activation row and weight vector vpsignb, vpmaddubsw, vpmaddwd, to
// float, FMA with the block's two scales multiplied in float32), so a row's result does not depend
// on the rows beside it. The scale products are made per tile before the loop, 8 a block
// ([m0 r0, m0 r1, m1 r0, ...]), from the rows' scales as pairs times each block's activation scales
// (`xsd`: per block the 4 rows' scales, each twice).
template <int MB>
inline void int8q_pack(const int8_t* xq, int64_t K, int8_t* dst) {
  for (int64_t k = 0; k + 32 <= K; k += 32)
    for (int m = 0; m < MB; ++m, dst += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_sign_epi8(v, v));
    }
}

// the scale products of 2 weight rows (`ws`, rows of nb) and the packed activation scales, 8 a block
inline void int8q_batch_scales(const float* xsd, const uint16_t* ws, int64_t nb, int64_t full, float* d) {
  int64_t b = 0;
  alignas(32) float pairs[16];
  for (; b + 8 <= full; b += 8) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + b)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + nb + b)));
    const __m256 lo = _mm256_unpacklo_ps(w0, w1), hi = _mm256_unpackhi_ps(w0, w1);  // blocks 0 1 4 5, 2 3 6 7
    _mm256_store_ps(pairs, _mm256_permute2f128_ps(lo, hi, 0x20));                      // blocks 0 1 2 3
    _mm256_store_ps(pairs + 8, _mm256_permute2f128_ps(lo, hi, 0x31));                  // blocks 4 5 6 7
    for (int j = 0; j < 8; ++j) {
      const __m256 wp = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(pairs + 2 * j)));
      _mm256_storeu_ps(d + 8 * (b + j), _mm256_mul_ps(_mm256_loadu_ps(xsd + 8 * (b + j)), wp));
    }
  }
  for (; b < full; ++b) {
    const float w0 = half_to_float(ws[b]), w1 = half_to_float(ws[nb + b]);
    const __m256 wp = _mm256_setr_ps(w0, w1, w0, w1, w0, w1, w0, w1);
    _mm256_storeu_ps(d + 8 * b, _mm256_mul_ps(_mm256_loadu_ps(xsd + 8 * b), wp));
  }
}

// One activation row's block against the two weight vectors in ymm10, ymm11 (X, AX: offsets of its
// x and |x| in the packed block; D0, D1: offsets of its two scale products; A0, A1: its accumulators):
// sign(w, x), |x| x that in int16 pairs, pairs to int32, to float, times the scales, added.
#define I8B_ROW(X, AX, D0, D1, A0, A1)              \
  "vmovdqu " AX "(%[xp]), %%ymm13\n\t"              \
  "vpsignb " X "(%[xp]), %%ymm10, %%ymm14\n\t"      \
  "vpsignb " X "(%[xp]), %%ymm11, %%ymm12\n\t"      \
  "vpmaddubsw %%ymm14, %%ymm13, %%ymm14\n\t"        \
  "vpmaddubsw %%ymm12, %%ymm13, %%ymm12\n\t"        \
  "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"          \
  "vpmaddwd %[ones], %%ymm12, %%ymm12\n\t"          \
  "vcvtdq2ps %%ymm14, %%ymm14\n\t"                  \
  "vcvtdq2ps %%ymm12, %%ymm12\n\t"                  \
  "vbroadcastss " D0 "(%[dp]), %%ymm13\n\t"         \
  "vfmadd231ps %%ymm13, %%ymm14, %[" A0 "]\n\t"     \
  "vbroadcastss " D1 "(%[dp]), %%ymm13\n\t"         \
  "vfmadd231ps %%ymm13, %%ymm12, %[" A1 "]\n\t"
#define I8B_HEAD                                    \
  "1:\n\t"                                          \
  "prefetcht0 (%[pf])\n\t"                          \
  "prefetcht0 (%[pf],%[pfr])\n\t"                   \
  "add %[pfk], %[pf]\n\t"                           \
  "vmovdqu (%[w]), %%ymm10\n\t"                     \
  "vmovdqu (%[w],%[K]), %%ymm11\n\t"                \
  "add $32, %[w]\n\t"
#define I8B_TAIL(STEP)                              \
  "add $" STEP ", %[xp]\n\t"                        \
  "add $32, %[dp]\n\t"                              \
  "dec %[n]\n\t"                                    \
  "jnz 1b\n\t"

// MB (3-4) activation rows (packed by int8q_pack) x 2 weight rows over all of K; `xq` (MB rows of K)
// for the last K % 32 inputs; `d` room for 8 floats a block. The loop is written in assembly because
// GCC's version of it (the same intrinsics) kept copying accumulators between registers and to the
// stack every step.
template <int MB>
inline void int8q_tile_batch2(const int8_t* xp, const float* xsd, const int8_t* xq, const float* xs, int64_t K,
                              int64_t nb, const int8_t* w, const uint16_t* ws, float* d, float out[MB][2]) {
  __m256 a[4][2];
  for (int m = 0; m < 4; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t n = K / 32;
  int8q_batch_scales(xsd, ws, nb, n, d);
  // the rows two tiles ahead, as int8q_tile: short rows (<= 2048 inputs) as the one contiguous run the
  // tile's rows make (64 bytes a step), long ones row by row
  const char* pf = reinterpret_cast<const char*>(w + 4 * K);
  const int64_t pfk = K <= 2048 ? 64 : 32, pfr = K <= 2048 ? 64 : K;
  const int8_t* wp = w;
  const float* dp = d;
  if (n > 0) {
    if constexpr (MB == 4) {
      asm(I8B_HEAD I8B_ROW("0", "32", "0", "4", "a00", "a01") I8B_ROW("64", "96", "8", "12", "a10", "a11")
              I8B_ROW("128", "160", "16", "20", "a20", "a21") I8B_ROW("192", "224", "24", "28", "a30", "a31")
                  I8B_TAIL("256")
          : [xp] "+r"(xp), [w] "+r"(wp), [dp] "+r"(dp), [pf] "+r"(pf), [n] "+r"(n), [a00] "+x"(a[0][0]),
            [a01] "+x"(a[0][1]), [a10] "+x"(a[1][0]), [a11] "+x"(a[1][1]), [a20] "+x"(a[2][0]), [a21] "+x"(a[2][1]),
            [a30] "+x"(a[3][0]), [a31] "+x"(a[3][1])
          : [K] "r"(K), [pfk] "r"(pfk), [pfr] "r"(pfr), [ones] "x"(ones)
          : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "cc", "memory");
    } else {
      static_assert(MB == 3, "3-4 activation rows");
      asm(I8B_HEAD I8B_ROW("0", "32", "0", "4", "a00", "a01") I8B_ROW("64", "96", "8", "12", "a10", "a11")
              I8B_ROW("128", "160", "16", "20", "a20", "a21") I8B_TAIL("192")
          : [xp] "+r"(xp), [w] "+r"(wp), [dp] "+r"(dp), [pf] "+r"(pf), [n] "+r"(n), [a00] "+x"(a[0][0]),
            [a01] "+x"(a[0][1]), [a10] "+x"(a[1][0]), [a11] "+x"(a[1][1]), [a20] "+x"(a[2][0]), [a21] "+x"(a[2][1])
          : [K] "r"(K), [pfk] "r"(pfk), [pfr] "r"(pfr), [ones] "x"(ones)
          : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "cc", "memory");
    }
  }
  int8q_finish<MB, 2>(a, xq, xs, K, nb, w, ws, out);
}
#undef I8B_ROW
#undef I8B_HEAD
#undef I8B_TAIL

// what the int8 tiles of one product share
struct Int8Call {
  const int8_t* xq;    // (M, K) activations in int8
  const float* xs;     // (M, nb) their scales
  const int8_t* xp;    // per group of 4 rows from BATCH8_FROM: int8q_pack's layout
  const float* xsd;    // per group of 4 rows: per block the 4 scales each twice (8 floats)
  const int8_t* w;     // (N, K)
  const uint16_t* ws;  // (N, nb) float16
  const float* bias;   // (N,) or null
  float* y;            // (M, N)
  int64_t M, N, K, nb;
};

template <int MB, int R>
inline void int8q_rows(const Int8Call& c, int64_t m, int64_t n, float* d) {
  float out[MB][R];
  const int8_t* xq = c.xq + m * c.K;
  const float* xs = c.xs + m * c.nb;
  if constexpr (MB >= BATCH8_FROM && R == 2)
    int8q_tile_batch2<MB>(c.xp + 2 * m * c.K, c.xsd + 2 * m * c.nb, xq, xs, c.K, c.nb, c.w + n * c.K,
                          c.ws + n * c.nb, d, out);
  else
    int8q_tile<MB, R>(xq, xs, c.K, c.nb, c.w + n * c.K, c.ws + n * c.nb, d, out);
  for (int mm = 0; mm < MB; ++mm)
    for (int r = 0; r < R; ++r) c.y[(m + mm) * c.N + n + r] = out[mm][r] + (c.bias ? c.bias[n + r] : 0.0f);
}

template <int MB>
void int8q_block(const Int8Call& c, int64_t m, int64_t n0, int64_t n1, float* d) {
  constexpr int R = MB < BATCH8_FROM ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) int8q_rows<MB, R>(c, m, n, d);
  for (; n < n1; ++n) int8q_rows<MB, 1>(c, m, n, d);
}


// 4-bit weights, in integers too: quantize()'s stored form as is (byte i of a row holds input 2i in
// its low nibble and 2i+1 in its high one, a float16 scale and low per group of 32 inputs), times the
// activations quantized to int8 per row and block of 32 (the int8 product's activations: one scale
// per whole row cost SmolLM2-135M KL 0.6 against float32 with groups of 128).
// One 32-byte load is 64 contiguous inputs, two groups, one per 128-bit half: `v & 15` gives the
// even ones, `(v >> 4) & 15` the odd ones, as unsigned bytes, which is what vpmaddubsw takes first;
// so only the activations are reordered (per 64 inputs: the 32 even then the 32 odd, each half one
// group) and the weights are read exactly as stored. Per group g, sum_k w x = xs_g x (scale_g x
// sum_k q x_int + low_g x sum_k x_int): the first sum in integers (q <= 15, |x| <= 127: pairs into
// int16 without saturating, then vpmaddwd into int32, 4 lanes a group), to float and added times
// scale_g x xs_g; the second from the groups' scaled activation sums (`xsum`: xs_g x sum x_int),
// a dot product with the lows after the loop (8 groups an instruction).

// the 64 inputs at byte `off` of a row: low nibbles (even inputs) and high nibbles (odd inputs)
inline void int4_unpack(const uint8_t* q, __m256i& even, __m256i& odd) {
  const __m256i nibble = _mm256_set1_epi8(15);
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  even = _mm256_and_si256(v, nibble);
  odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
}

// the same for a tail of 32 inputs (16 bytes): the upper half of each vector is zero
inline void int4_unpack_half(const uint8_t* q, __m256i& even, __m256i& odd) {
  const __m256i nibble = _mm256_set1_epi8(15);
  __m256i v = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  even = _mm256_and_si256(v, nibble);
  odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
}

inline __m256i load_half_zext(const int8_t* p) {
  return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 float16 values to float
inline __m256 half8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// R rows x MB activation rows over all of K (groups of 32). `xq` the reordered int8 activations (MB
// rows of K), `xsv` their scales per step of 64 inputs as a vector ([xs_g x4 | xs_g+1 x4], MB rows of
// K / 64 + 1 steps), `xsum` the groups' scaled sums (MB rows of `groups`).
template <int MB, int R>
inline void int4q_tile(const int8_t* xq, const float* xsv, const float* xsum, int64_t K, const uint8_t* q,
                       const uint16_t* scales, const uint16_t* lows, float out[MB][R]) {
  const int64_t groups = K / 32, half = K / 2, steps = K / 64, vsteps = (K + 63) / 64;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t k = st * 64, g = 2 * st;
    __m256 xv[MB];
    __m256i xe[MB], xo[MB];
    for (int m = 0; m < MB; ++m) {
      xv[m] = _mm256_loadu_ps(xsv + (m * vsteps + st) * 8);
      xe[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
      xo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k + 32));
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = q + r * half + k / 2;
      // the rows two tiles ahead: the big matrices come from memory, not cache; short rows as one
      // contiguous run, line after line, as for int8 (gate/up: 15 against 9-10 GB/s), long ones row by row
      if (half <= 2048)
        _mm_prefetch(reinterpret_cast<const char*>(q + 2 * R * half + (st * R + r) * 32), _MM_HINT_T0);
      else
        _mm_prefetch(reinterpret_cast<const char*>(row + 2 * R * half), _MM_HINT_T0);
      __m256i even, odd;
      int4_unpack(row, even, odd);
      // the two groups' float16 scales (adjacent) as floats: [s_g x4 | s_g+1 x4]
      int32_t pair;
      std::memcpy(&pair, scales + r * groups + g, sizeof pair);
      const __m256 sv =
          _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(pair))), spread);
      for (int m = 0; m < MB; ++m) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(even, xe[m]), _mm256_maddubs_epi16(odd, xo[m]));
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(sv, xv[m]), acc[m][r]);
      }
    }
  }
  if (steps * 64 < K) {  // a last group of 32 (K = 64 n + 32)
    const int64_t k = steps * 64, g = groups - 1;
    for (int r = 0; r < R; ++r) {
      __m256i even, odd;
      int4_unpack_half(q + r * half + k / 2, even, odd);
      const __m256 sv = _mm256_set1_ps(half_to_float(scales[r * groups + g]));
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * K + k;
        const __m256i pm = _mm256_add_epi16(_mm256_maddubs_epi16(even, load_half_zext(xm)),
                                            _mm256_maddubs_epi16(odd, load_half_zext(xm + 16)));
        const __m256 xv = _mm256_loadu_ps(xsv + (m * vsteps + steps) * 8);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pm, ones)), _mm256_mul_ps(sv, xv), acc[m][r]);
      }
    }
  }
  // the lows' part: sum_g low_g x xsum_g, 8 groups an instruction, into the same accumulators
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8)
    for (int r = 0; r < R; ++r) {
      const __m256 lv = half8(lows + r * groups + g);
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(lv, _mm256_loadu_ps(xsum + m * groups + g), acc[m][r]);
    }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = g; t < groups; ++t) s += half_to_float(lows[r * groups + t]) * xsum[m * groups + t];
      out[m][r] = s;
    }
}

template <int MB, int R>
inline void int4q_rows(const int8_t* xq, const float* xsv, const float* xsum, int64_t K, int64_t N,
                       const uint8_t* q, const uint16_t* scales, const uint16_t* lows, const float* bias,
                       float* y, int64_t n) {
  const int64_t groups = K / 32;
  float out[MB][R];
  int4q_tile<MB, R>(xq, xsv, xsum, K, q + n * (K / 2), scales + n * groups, lows + n * groups, out);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = out[m][r] + (bias ? bias[n + r] : 0.0f);
}

template <int MB>
void int4q_block(const int8_t* xq, const float* xsv, const float* xsum, int64_t K, int64_t N,
                 const uint8_t* q, const uint16_t* scales, const uint16_t* lows, const float* bias,
                 float* y, int64_t n0, int64_t n1) {
  constexpr int R = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) int4q_rows<MB, R>(xq, xsv, xsum, K, N, q, scales, lows, bias, y, n);
  for (; n < n1; ++n) int4q_rows<MB, 1>(xq, xsv, xsum, K, N, q, scales, lows, bias, y, n);
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "activations must be contiguous float32 (rows, inputs)");
  TORCH_CHECK(x.size(1) == K, "activations have ", x.size(1), " inputs, the weights ", K);
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
              "bias must be contiguous float32 (outputs,)");
  return bias->data_ptr<float>();
}

// int8_matmul's and int8_prompt_matmul's weights: values (N, K) int8, scales (N, ceil(K / 32)) float16
void check_int8(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scales) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kInt8 && values.is_contiguous(),
              "values must be contiguous int8 (outputs, inputs)");
  const int64_t N = values.size(0), K = values.size(1);
  check_x(x, K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == (K + 31) / 32 &&
                  scales.scalar_type() == torch::kHalf && scales.is_contiguous(),
              "scales must be contiguous float16 (outputs, ceil(inputs / 32))");
}

}  // namespace

// y (M, N) = x (M, K) @ w^T + bias, w[n, k] = values[n, k] x scales[n, k / 32], the activations in
// int8 per row and block of 32 (see int8q_tile)
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor values, torch::Tensor scales,
                          c10::optional<torch::Tensor> bias) {
  check_int8(x, values, scales);
  const int64_t N = values.size(0), K = values.size(1), M = x.size(0), nb = (K + 31) / 32;
  auto y = torch::empty({M, N}, x.options());
  const float* xd = x.data_ptr<float>();
  std::vector<int8_t> xq(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M * nb));
  for (int64_t m = 0; m < M; ++m) quantize_row_blocks(xd + m * K, K, xq.data() + m * K, xs.data() + m * nb);
  // each group of 3-4 rows of a batch packed for the batch tile, with its scales 8 a block
  const bool batch = M >= BATCH8_FROM;
  std::vector<int8_t> xp(batch ? static_cast<size_t>(2 * M * K) : 0);
  std::vector<float> xsd(batch ? static_cast<size_t>(2 * (M + 3) * nb) : 0, 0.0f);
  for (int64_t m = 0; m < M && batch; m += 4) {
    const int64_t mb = std::min<int64_t>(4, M - m);
    const int8_t* xm = xq.data() + m * K;
    int8_t* pm = xp.data() + 2 * m * K;
    switch (mb) {
      case 1: break;
      case 2: int8q_pack<2>(xm, K, pm); break;
      case 3: int8q_pack<3>(xm, K, pm); break;
      default: int8q_pack<4>(xm, K, pm); break;
    }
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < mb; ++i) xsd[2 * m * nb + 8 * b + 2 * i] = xsd[2 * m * nb + 8 * b + 2 * i + 1] = xs[(m + i) * nb + b];
  }
  const Int8Call c{xq.data(), xs.data(), xp.data(), xsd.data(), values.data_ptr<int8_t>(),
                   reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), bias_ptr(bias, N),
                   y.data_ptr<float>(), M, N, K, nb};
  const int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(static_cast<size_t>(8 * nb));  // a tile's scale products (at most 8 a block)
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * BLOCK_ROWS, n1 = std::min(N, n0 + BLOCK_ROWS);
      for (int64_t m = 0; m < M;) {
        const int64_t mb = std::min<int64_t>(4, M - m);
        switch (mb) {
          case 1: int8q_block<1>(c, m, n0, n1, d.data()); break;
          case 2: int8q_block<2>(c, m, n0, n1, d.data()); break;
          case 3: int8q_block<3>(c, m, n0, n1, d.data()); break;
          default: int8q_block<4>(c, m, n0, n1, d.data()); break;
        }
        m += mb;
      }
    }
  });
  return y;
}


// int4_matmul's arguments: q4 (outputs, inputs / 2) uint8, scales and lows (outputs, inputs / 32) float16.
void check_int4(const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scales,
                const torch::Tensor& lows) {
  TORCH_CHECK(q4.dim() == 2 && q4.scalar_type() == torch::kUInt8 && q4.is_contiguous(),
              "q4 must be contiguous uint8 (outputs, inputs / 2)");
  check_x(x, q4.size(1) * 2);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == q4.size(0) && scales.scalar_type() == torch::kHalf &&
                  scales.is_contiguous() && lows.sizes() == scales.sizes() &&
                  lows.scalar_type() == torch::kHalf && lows.is_contiguous(),
              "scales and lows must be contiguous float16 (outputs, groups)");
}

// y (M, N) = x (M, K) @ w^T + bias, w[n, k] = q(n, k) x scales[n, k / 32] + lows[n, k / 32]
torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor q4, torch::Tensor scales, torch::Tensor lows,
                          c10::optional<torch::Tensor> bias) {
  check_int4(x, q4, scales, lows);
  const int64_t N = q4.size(0), K = q4.size(1) * 2, M = x.size(0);
  const int64_t groups = scales.size(1);
  TORCH_CHECK(K % 32 == 0 && groups == K / 32, "int4 takes groups of 32 inputs: ", K, " inputs, ", groups, " groups");
  const int64_t vsteps = (K + 63) / 64;
  // activation rows in int8 per block of 32 (as for int8 weights), reordered as the nibbles come
  // (per 64 inputs: 32 even, 32 odd; a last 32: 16 even, 16 odd), their scales per step of 64 as a
  // vector, and their groups' sums times the groups' scales
  const float* xd = x.data_ptr<float>();
  std::vector<int8_t> xq(static_cast<size_t>(M * K));
  std::vector<float> xsv(static_cast<size_t>(M * vsteps * 8)), xsum(static_cast<size_t>(M * groups));
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  auto block_scale = [&](const float* p) {
    const __m256 mx = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p), magnitude), _mm256_and_ps(_mm256_loadu_ps(p + 8), magnitude)),
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p + 16), magnitude),
                      _mm256_and_ps(_mm256_loadu_ps(p + 24), magnitude)));
    return hmax(mx) / 127.0f;
  };
  auto inverse = [](float scale) { return _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f); };
  auto quantize_row = [&](int64_t m) {
    const float* row = xd + m * K;
    // within each 16 bytes: the 8 even inputs, then the 8 odd ones
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    int8_t* dst = xq.data() + m * K;
    float* sums = xsum.data() + m * groups;
    float* sv = xsv.data() + m * vsteps * 8;
    int32_t s0, s1;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const float a0 = block_scale(row + k), a1 = block_scale(row + k + 32);
      // 64-bit pieces E0 O0 E1 O1 and E2 O2 E3 O3 (E = even inputs, O = odd, of each 16) ...
      __m256i lo = _mm256_shuffle_epi8(quantize32(row + k, inverse(a0), s0), split);
      __m256i hi = _mm256_shuffle_epi8(quantize32(row + k + 32, inverse(a1), s1), split);
      lo = _mm256_permute4x64_epi64(lo, 0xd8);  // E0 E1 O0 O1
      hi = _mm256_permute4x64_epi64(hi, 0xd8);  // E2 E3 O2 O3
      // ... to the 32 even inputs, then the 32 odd ones
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
      sums[k / 32] = static_cast<float>(s0) * a0;
      sums[k / 32 + 1] = static_cast<float>(s1) * a1;
      _mm256_storeu_ps(sv + (k / 64) * 8, _mm256_setr_m128(_mm_set1_ps(a0), _mm_set1_ps(a1)));
    }
    if (k < K) {  // a last 32: its 16 even inputs, then its 16 odd ones
      const float a0 = block_scale(row + k);
      __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(quantize32(row + k, inverse(a0), s0), split), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), v);
      sums[k / 32] = static_cast<float>(s0) * a0;
      _mm256_storeu_ps(sv + (k / 64) * 8, _mm256_set1_ps(a0));
    }
  };
  // a prompt's many rows on the thread pool; a decode step's few on this thread
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(m);
  });
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qd = q4.data_ptr<uint8_t>();
  const uint16_t* sd = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* ld = reinterpret_cast<const uint16_t*>(lows.data_ptr<at::Half>());
  const float* b = bias_ptr(bias, N);
  float* yd = y.data_ptr<float>();
  const int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * BLOCK_ROWS, n1 = std::min(N, n0 + BLOCK_ROWS);
      for (int64_t m = 0; m < M;) {
        const int64_t mb = std::min<int64_t>(4, M - m);
        const int8_t* xm = xq.data() + m * K;
        const float* vm = xsv.data() + m * vsteps * 8;
        const float* sm = xsum.data() + m * groups;
        float* ym = yd + m * N;
        switch (mb) {
          case 1: int4q_block<1>(xm, vm, sm, K, N, qd, sd, ld, b, ym, n0, n1); break;
          case 2: int4q_block<2>(xm, vm, sm, K, N, qd, sd, ld, b, ym, n0, n1); break;
          case 3: int4q_block<3>(xm, vm, sm, K, N, qd, sd, ld, b, ym, n0, n1); break;
          default: int4q_block<4>(xm, vm, sm, K, N, qd, sd, ld, b, ym, n0, n1); break;
        }
        m += mb;
      }
    }
  });
  return y;
}

// ==== int8 prompt GEMM (helper prefill) ====================================================
// A prompt is a product with many activation rows (M up to a few hundred): compute-bound, not
// memory-bound. The numbers are int8_matmul's exactly (Q8_0 x Q8_0: per row and block of 32 inputs
// an int8 activation scale, per weight row and block a float16 scale, integer block dots), laid out
// so the per-block float work is spread over many products: the lanes of a vector are 8 weight
// rows, not 32 inputs. Each thread packs a panel of 16 weight rows per call, widened to int16, per 2
// inputs the 16 rows' 2 values side by side (64 x K bytes, L2-resident, read by every activation
// row; packing reads the weights once per call), and the activation rows once per call, per group
// of 6 rows and 2 inputs each row's 2 int16 values. A step broadcasts a row's pair (vpbroadcastd)
// and takes vpmaddwd with each 8-row weight vector (16 multiply-adds, exact in int32) and vpaddd:
// 6 activation rows x 16 weight rows in 12 accumulators. At each block's end the 12 go to float
// and are added times (weight scales x activation scale) into float accumulators kept in L1.
// Why int16, measured on the 2-core AVX2 EPYC (Zen 3; one panel in L1, 256 rows, one thread): with
// signed int8 on both sides vpmaddubsw needs vpsignb first, and on Zen 3 vpsignb issues on the same
// two pipes as the multiplies: 3 of them per 32 multiply-adds where the previous kernel (7-bit
// unsigned activations with a zero point, one scale per row) took 2: 59-61 G multiply-adds/s
// against its 77-82. vpmaddwd on int16 takes 2 multiplies and 2 adds (the adds issue on all 4
// pipes) per 32: 65-66. The previous kernel's 3 instructions per 32 stay out of reach: signed x
// signed bytes cost a 4th on AVX2 without VNNI.
namespace prompt8 {

constexpr int A = 6;   // activation rows per group
constexpr int P = 16;  // weight rows per panel (two vectors of 8 lanes)
constexpr int64_t XB = 16 * A * 4;  // a group's bytes per block: 16 steps x 6 rows x 2 int16
constexpr int64_t WB = 16 * P * 4;  // a panel's bytes per block: 16 steps x 16 rows x 2 int16
// blocks per piece of K: the panel's piece (8 KB) stays in L1 while every group of rows passes
// (over all of K the panel, 48-287 KB, came from L2 on every step)
constexpr int64_t KC_BLOCKS = 8;

#define P8_STR_(x) #x
#define P8_STR(x) P8_STR_(x)
// step S of a block, activation row R of the group: weights at S x 64 (+0 rows 0-7, +32 rows 8-15),
// the row's pair at S x 24 + R x 4
#define P8_ROW(S, R, ACC0, ACC1, FINISH) "vpbroadcastd " P8_STR(S * 24 + R * 4) "(%[x]), %%ymm15\n\t" FINISH(ACC0, ACC1)
#define P8_FIRST(ACC0, ACC1)                        \
  "vpmaddwd %%ymm12, %%ymm15, %[" ACC0 "]\n\t"      \
  "vpmaddwd %%ymm13, %%ymm15, %[" ACC1 "]\n\t"
#define P8_ADD(ACC0, ACC1)                          \
  "vpmaddwd %%ymm12, %%ymm15, %%ymm14\n\t"          \
  "vpaddd %%ymm14, %[" ACC0 "], %[" ACC0 "]\n\t"    \
  "vpmaddwd %%ymm13, %%ymm15, %%ymm14\n\t"          \
  "vpaddd %%ymm14, %[" ACC1 "], %[" ACC1 "]\n\t"
#define P8_STEP(S, F)                                                                                \
  "vmovdqa " P8_STR(S * 64) "(%[w]), %%ymm12\n\t"                                                    \
  "vmovdqa " P8_STR(S * 64 + 32) "(%[w]), %%ymm13\n\t"                                               \
  P8_ROW(S, 0, "a00", "a01", F) P8_ROW(S, 1, "a10", "a11", F) P8_ROW(S, 2, "a20", "a21", F)          \
  P8_ROW(S, 3, "a30", "a31", F) P8_ROW(S, 4, "a40", "a41", F) P8_ROW(S, 5, "a50", "a51", F)

// One group of 6 activation rows x one panel of 16 weight rows over nb blocks: `x` the group's
// packed blocks, `xs` their scales ([nb][6]), `w` the panel's, `ws` their scales as float ([nb][16]);
// the 6 x 16 sums are added into `f` (96 floats, 32-byte aligned), block after block. The block's loop is assembly: GCC's
// version of the same intrinsics spilled accumulators.
inline void group_panel(const int8_t* x, const float* xs, const int8_t* w, const float* ws, int64_t nb, float* f) {
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
    __asm__(P8_STEP(0, P8_FIRST) P8_STEP(1, P8_ADD) P8_STEP(2, P8_ADD) P8_STEP(3, P8_ADD) P8_STEP(4, P8_ADD)
                P8_STEP(5, P8_ADD) P8_STEP(6, P8_ADD) P8_STEP(7, P8_ADD) P8_STEP(8, P8_ADD) P8_STEP(9, P8_ADD)
                    P8_STEP(10, P8_ADD) P8_STEP(11, P8_ADD) P8_STEP(12, P8_ADD) P8_STEP(13, P8_ADD)
                        P8_STEP(14, P8_ADD) P8_STEP(15, P8_ADD)
            : [a00] "=&x"(a00), [a01] "=&x"(a01), [a10] "=&x"(a10), [a11] "=&x"(a11), [a20] "=&x"(a20),
              [a21] "=&x"(a21), [a30] "=&x"(a30), [a31] "=&x"(a31), [a40] "=&x"(a40), [a41] "=&x"(a41),
              [a50] "=&x"(a50), [a51] "=&x"(a51)
            : [w] "r"(w + b * WB), [x] "r"(x + b * XB)
            : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    const __m256 s0 = _mm256_load_ps(ws + b * P), s1 = _mm256_load_ps(ws + b * P + 8);
    const __m256i acc[A][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    for (int r = 0; r < A; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xs + b * A + r);
      float* fr = f + r * P;
      _mm256_store_ps(fr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(s0, xb), _mm256_load_ps(fr)));
      _mm256_store_ps(fr + 8,
                      _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(s1, xb), _mm256_load_ps(fr + 8)));
    }
  }
}
#undef P8_ROW
#undef P8_FIRST
#undef P8_ADD
#undef P8_STEP
#undef P8_STR
#undef P8_STR_

// 8 rows of 8 dwords to 8 vectors, vector j holding dword j of every row
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, 4-7
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);      // dwords 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);      // 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // 3 | 7
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// weight rows n0..n0+15 (zeros past N) to the panel layout, their scales to float (zeros past N)
inline void pack_panel(const int8_t* w, const uint16_t* ws, int64_t N, int64_t K, int64_t nb, int64_t n0,
                       int8_t* panel, float* wsp) {
  alignas(32) int8_t tail[P][32];
  const int64_t full = K / 32;
  if (full < nb) {  // the last short block: the rows' last K % 32 bytes, zero-padded
    std::memset(tail, 0, sizeof tail);
    for (int r = 0; r < P && n0 + r < N; ++r) std::memcpy(tail[r], w + (n0 + r) * K + full * 32, K - full * 32);
  }
  for (int64_t b = 0; b < nb; ++b) {
    for (int h = 0; h < 2; ++h) {   // rows 0-7, 8-15
      for (int half = 0; half < 2; ++half) {  // inputs 0-15 (steps 0-7), 16-31 (steps 8-15)
        __m256i rows[8];
        for (int i = 0; i < 8; ++i) {
          const int64_t n = n0 + 8 * h + i;
          const int8_t* src = n >= N ? nullptr : (b < full ? w + n * K + 32 * b : tail[8 * h + i]);
          rows[i] = src ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * half)))
                        : _mm256_setzero_si256();
        }
        transpose8(rows);
        for (int j = 0; j < 8; ++j)
          _mm256_store_si256(reinterpret_cast<__m256i*>(panel + b * WB + (8 * half + j) * 64 + h * 32), rows[j]);
      }
    }
    for (int r = 0; r < P; ++r) wsp[b * P + r] = n0 + r < N ? half_to_float(ws[(n0 + r) * nb + b]) : 0.0f;
  }
}

// activation row `a` of its group, quantized (`q`: nb x 32 values, zero past K), into the group's
// packed blocks as int16, per step of 2 inputs its pair
inline void pack_row(const int8_t* q, int64_t nb, int a, int8_t* group) {
  for (int64_t b = 0; b < nb; ++b) {
    alignas(32) int32_t pairs[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs),
                       _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * b))));
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + 8),
                       _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * b + 16))));
    int8_t* dst = group + b * XB + a * 4;
    for (int s = 0; s < 16; ++s) std::memcpy(dst + s * A * 4, pairs + s, 4);
  }
}

}  // namespace prompt8

// y (M, N) = x (M, K) @ w^T + bias as int8_matmul computes it (same quantization, same integer
// block dots), for prompts (M > a few rows)
torch::Tensor int8_prompt_matmul(torch::Tensor x, torch::Tensor values, torch::Tensor scales,
                                 c10::optional<torch::Tensor> bias) {
  using namespace prompt8;
  check_int8(x, values, scales);
  const int64_t N = values.size(0), K = values.size(1), M = x.size(0), nb = (K + 31) / 32;
  TORCH_CHECK(K > 0, "the weights have no inputs");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t groups = (M + A - 1) / A, panels = (N + P - 1) / P;
  // the activations: per group of 6 rows nb blocks (rows past M zero), scales [nb][6]
  auto packed = torch::zeros({groups * nb * XB + 32}, torch::dtype(torch::kInt8));
  int8_t* xp = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(packed.data_ptr<int8_t>()) + 31) & ~uintptr_t(31));
  std::vector<float> xs(static_cast<size_t>(groups * nb * A), 0.0f);
  const float* xd = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(static_cast<size_t>(nb * 32), 0);
    std::vector<float> s(static_cast<size_t>(nb));
    for (int64_t m = begin; m < end; ++m) {
      quantize_row_blocks(xd + m * K, K, q.data(), s.data());
      const int64_t g = m / A;
      const int a = static_cast<int>(m % A);
      pack_row(q.data(), nb, a, xp + g * nb * XB);
      for (int64_t b = 0; b < nb; ++b) xs[(g * nb + b) * A + a] = s[b];
    }
  });
  const int8_t* w = values.data_ptr<int8_t>();
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const float* bias_d = bias_ptr(bias, N);
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    auto panel_t = torch::empty({nb * WB + 32}, torch::dtype(torch::kInt8));
    int8_t* panel =
        reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(panel_t.data_ptr<int8_t>()) + 31) & ~uintptr_t(31));
    auto wsp_t = torch::empty({nb * P + 8}, torch::dtype(torch::kFloat32));
    float* wsp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wsp_t.data_ptr<float>()) + 31) & ~uintptr_t(31));
    auto f_t = torch::empty({groups * A * P + 8}, torch::dtype(torch::kFloat32));  // the panel's sums
    float* f = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(f_t.data_ptr<float>()) + 31) & ~uintptr_t(31));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * P, cols = std::min<int64_t>(P, N - n0);
      pack_panel(w, ws, N, K, nb, n0, panel, wsp);
      std::memset(f, 0, sizeof(float) * groups * A * P);
      for (int64_t b0 = 0; b0 < nb; b0 += KC_BLOCKS) {
        const int64_t blocks = std::min(KC_BLOCKS, nb - b0);
        for (int64_t g = 0; g < groups; ++g)
          group_panel(xp + (g * nb + b0) * XB, xs.data() + (g * nb + b0) * A, panel + b0 * WB, wsp + b0 * P, blocks,
                      f + g * A * P);
      }
      if (cols == P) {
        const __m256 b0 = bias_d ? _mm256_loadu_ps(bias_d + n0) : _mm256_setzero_ps();
        const __m256 b1 = bias_d ? _mm256_loadu_ps(bias_d + n0 + 8) : _mm256_setzero_ps();
        for (int64_t m = 0; m < M; ++m) {
          _mm256_storeu_ps(yd + m * N + n0, _mm256_add_ps(_mm256_load_ps(f + m * P), b0));
          _mm256_storeu_ps(yd + m * N + n0 + 8, _mm256_add_ps(_mm256_load_ps(f + m * P + 8), b1));
        }
      } else {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = 0; c < cols; ++c) yd[m * N + n0 + c] = f[m * P + c] + (bias_d ? bias_d[n0 + c] : 0.0f);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// The decode step's small operations (service/inference/decoder.py), one call each where PyTorch took
// several ops a layer (RMSNorm alone was pow, mean, add, rsqrt, two muls: ~8 ms a step at 57 norms),
// for one activation row per sequence. Same arithmetic as Transformers' Qwen2 layer, in float32.

namespace decode {

// exp for x <= 0 (softmax after the max, SiLU's exp(-|x|)): 2^n x a degree-6 polynomial on
// [-ln2/2, ln2/2], within ~2 ulp of expf; below -87 it gives 0
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace decode

// h (M, D) += delta (M, D) in place when delta is given; returns RMSNorm(h) x weight (M, D)
torch::Tensor decode_add_rms_norm(torch::Tensor h, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                                  double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32 && h.is_contiguous(),
              "h must be contiguous float32 (rows, width)");
  const int64_t M = h.size(0), D = h.size(1);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == D,
              "weight must be contiguous float32 (width,)");
  float* hd = h.data_ptr<float>();
  if (delta.has_value()) {
    TORCH_CHECK(delta->scalar_type() == torch::kFloat32 && delta->is_contiguous() && delta->numel() == M * D,
                "delta must be contiguous float32 like h");
    const float* dd = delta->data_ptr<float>();
    for (int64_t i = 0; i < M * D; ++i) hd[i] += dd[i];
  }
  auto out = torch::empty({M, D}, h.options());
  const float* w = weight.data_ptr<float>();
  float* od = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = hd + m * D;
    const float mean = decode::dot(row, row, D) / static_cast<float>(D);
    const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    float* o = od + m * D;
    for (int64_t i = 0; i < D; ++i) o[i] = w[i] * (row[i] * inv);
  }
  return out;
}

// SiLU(gate) x up for gate_up (M, 2I) = [gate | up] per row: returns (M, I). A prompt's rows (the lean
// prefill, hundreds of them) are split over the threads; a decode step's few run on the caller's.
torch::Tensor decode_silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == torch::kFloat32 && gate_up.is_contiguous() &&
                  gate_up.size(1) % 16 == 0,
              "gate_up must be contiguous float32 (rows, 2 x inner), inner a multiple of 8");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({M, I}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* gate = g + m * 2 * I;
      const float* up = gate + I;
      float* om = o + m * I;
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 x = _mm256_loadu_ps(gate + i);
        // sigmoid(x) = 1 / (1 + exp(-x)), from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below
        const __m256 e = decode::exp_nonpositive(_mm256_xor_ps(_mm256_and_ps(x, magnitude), _mm256_set1_ps(-0.0f)));
        const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), x);  // sign bit of x picks e / (1 + e)
        _mm256_storeu_ps(om + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(up + i)));
      }
    }
  });
  return out;
}

// One decode step of grouped-query attention for M rows, Transformers' Qwen2 arithmetic:
// qkv (M, (H + 2 KV) D) the fused q/k/v product; cos/sin (M, D) the rows' rotary tables; q and k
// rotated (x cos + rotate_half(x) sin); k and v written into keys/values (M, KV, capacity, D) at
// `position`; each query head attends to positions 0..position of its row where mask (M, >= position + 1,
// 1: a token, 0: padding) is 1, scores = q.k x scale, softmax, sum of values. Returns (M, H D).
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                               torch::Tensor values, torch::Tensor mask, int64_t position, int64_t heads,
                               double scale) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == torch::kFloat32 && keys.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == torch::kFloat32 &&
                  values.is_contiguous(),
              "keys and values must be contiguous float32 (rows, kv_heads, capacity, dim)");
  const int64_t M = keys.size(0), KV = keys.size(1), C = keys.size(2), D = keys.size(3), H = heads;
  TORCH_CHECK(H % KV == 0 && D % 2 == 0 && position >= 0 && position < C, "bad heads, dim or position");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == M && qkv.size(1) == (H + 2 * KV) * D &&
                  qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous(),
              "qkv must be contiguous float32 (rows, (heads + 2 kv_heads) dim)");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == M && cos.size(1) == D && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous float32 (rows, dim)");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == M && mask.size(1) > position &&
                  mask.scalar_type() == torch::kLong && mask.is_contiguous(),
              "mask must be contiguous int64 (rows, > position)");
  const int64_t L = position + 1, half = D / 2, group = H / KV, width = (H + 2 * KV) * D;
  float* qd = qkv.data_ptr<float>();  // q and k rotated in place (the caller's product, used once)
  const float* cd = cos.data_ptr<float>();
  const float* sd = sin.data_ptr<float>();
  float* kd = keys.data_ptr<float>();
  float* vd = values.data_ptr<float>();
  const int64_t* md = mask.data_ptr<int64_t>();
  const int64_t mask_stride = mask.size(1);
  std::vector<float> tmp(static_cast<size_t>(D));
  for (int64_t m = 0; m < M; ++m) {
    const float* c = cd + m * D;
    const float* s = sd + m * D;
    for (int64_t hh = 0; hh < H + KV; ++hh) {
      float* x = qd + m * width + hh * D;
      for (int64_t i = 0; i < half; ++i) {
        tmp[i] = x[i] * c[i] + (-x[i + half]) * s[i];
        tmp[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
      std::memcpy(x, tmp.data(), sizeof(float) * D);
    }
    for (int64_t kv = 0; kv < KV; ++kv) {
      const int64_t at = ((m * KV + kv) * C + position) * D;
      std::memcpy(kd + at, qd + m * width + (H + kv) * D, sizeof(float) * D);
      std::memcpy(vd + at, qd + m * width + (H + KV + kv) * D, sizeof(float) * D);
    }
  }
  auto out = torch::empty({M, H * D}, qkv.options());
  float* od = out.data_ptr<float>();
  at::parallel_for(0, M * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(L));
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / H, hh = task % H, kv = hh / group;
      const float* q = qd + m * width + hh * D;
      const float* kbase = kd + (m * KV + kv) * C * D;
      const float* vbase = vd + (m * KV + kv) * C * D;
      const int64_t* row_mask = md + m * mask_stride;
      float best = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        if (row_mask[j] == 0) {
          scores[j] = -INFINITY;
          continue;
        }
        scores[j] = decode::dot(q, kbase + j * D, D) * static_cast<float>(scale);
        best = std::max(best, scores[j]);
      }
      float total = 0.0f;
      int64_t j = 0;
      const __m256 vbest = _mm256_set1_ps(best);
      __m256 vtotal = _mm256_setzero_ps();
      for (; j + 8 <= L; j += 8) {
        const __m256 e = decode::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), vbest));
        _mm256_storeu_ps(scores.data() + j, e);
        vtotal = _mm256_add_ps(vtotal, e);
      }
      total = hsum(vtotal);
      for (; j < L; ++j) {
        scores[j] = std::exp(scores[j] - best);
        total += scores[j];
      }
      const float inv = 1.0f / total;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t jj = 0; jj < L; ++jj) {
        const float p = scores[jj] * inv;
        if (p == 0.0f) continue;
        const __m256 vp = _mm256_set1_ps(p);
        const float* v = vbase + jj * D;
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
          _mm256_storeu_ps(acc.data() + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc.data() + i)));
        for (; i < D; ++i) acc[i] += p * v[i];
      }
      std::memcpy(od + m * H * D + hh * D, acc.data(), sizeof(float) * D);
    }
  });
  return out;
}
