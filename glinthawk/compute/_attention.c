/* Fused decode attention over the KV store, for CPUs.
 *
 * One query token per sequence attends over that sequence's cached keys and values. Each
 * (sequence, KV head) pair's K and V are contiguous [length, head_dim] slabs, read once
 * each (q.K, softmax, then p.V), with the `group` query heads that share the KV head
 * served by the same read. Three implementations, picked per call (pick_kernel):
 *   - AVX512_BF16 (bf16 caches): vdpbf16ps on the cache as stored, no conversion;
 *   - AVX-512F: 16 scores at a time, summed by one transposing reduction tree;
 *   - portable C, compiled for x86-64-v4/v3/baseline and picked by the loader.
 * All accumulate in float32.
 *
 * The callers (glinthawk/compute/attention.py, attention_kernels.py) check every shape, dtype and range; this
 * file trusts its arguments. The caller also splits the work items into slices, one per
 * thread, and passes them all (run_slices): they run as one parallel region of torch's
 * own OpenMP runtime when thread_policy.py has handed over its entry points (use_openmp), so
 * the kernels take torch's worker threads, which are still spinning after the matmul
 * before; otherwise the caller passes one slice per call, from its own threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"
#include "_openmp.h"


/* Tokens handled per step of each pass: a block of K or V rows (as float32, at most
 * 32 x 256 floats) stays in L1 while every query head of the group uses it. */
#define BLOCK 32
#define MAX_DIM 256 /* largest head_dim the kernels take; exported for attention_kernels.py */

/* Rows t0..t0+n-1 of a [length, dim] slab as float32: the slab itself, or `buffer` filled
 * from bfloat16 or int8 (unscaled: the callers apply an int8 row's scale to its score or
 * its probability, once per token rather than once per element). */
static inline const float *rows_as_float(const void *slab, int64_t t0, int64_t n, int dim, int kv_dtype,
                                         float *restrict buffer) {
    if (kv_dtype == FLOAT32) return (const float *)slab + t0 * dim;
    if (kv_dtype == INT8) {
        const int8_t *restrict source = (const int8_t *)slab + t0 * dim;
        for (int64_t i = 0; i < n * dim; i++) buffer[i] = (float)source[i];
        return buffer;
    }
    const uint16_t *restrict source = (const uint16_t *)slab + t0 * dim;
    for (int64_t i = 0; i < n * dim; i++) buffer[i] = bf16_to_float(source[i]);
    return buffer;
}

/* Each of `group` rows of `length` values times its token's bf16 scale: an int8 cache's key
 * scales on the scores, its value scales on the probabilities. */
static inline __attribute__((always_inline)) void scale_rows(float *restrict rows, int64_t length, int group,
                                                             const uint16_t *restrict scales) {
    for (int r = 0; r < group; r++)
        for (int64_t t = 0; t < length; t++) rows[r * length + t] *= bf16_to_float(scales[t]);
}

/* Each of `group` rows of `length` scores becomes its softmax, in place. */
static inline __attribute__((always_inline)) void softmax_rows(float *restrict scores, int64_t length, int group) {
    for (int r = 0; r < group; r++) {
        float *restrict s = scores + r * length;
        float highest = s[0];
        float lanes[16];  /* a running maximum per lane: one chain of compares would wait on each */
        for (int j = 0; j < 16; j++) lanes[j] = highest;
        int64_t t = 0;
        for (; t + 16 <= length; t += 16)
            for (int j = 0; j < 16; j++) lanes[j] = s[t + j] > lanes[j] ? s[t + j] : lanes[j];
        for (; t < length; t++) highest = s[t] > highest ? s[t] : highest;
        for (int j = 0; j < 16; j++) highest = lanes[j] > highest ? lanes[j] : highest;
        float total = 0.0f;
        for (t = 0; t < length; t++) {
            s[t] = exp_nonpositive(s[t] - highest);
            total += s[t];
        }
        const float inverse = 1.0f / total;
        for (t = 0; t < length; t++) s[t] *= inverse;
    }
}

/* out[group][dim] = softmax(q[group][dim] . K^T * scale) . V for one KV head of one sequence.
 * scores: scratch of group * length floats; buffer: scratch of BLOCK * dim floats.
 * Always inlined into the variants below, where dim and kv_dtype are constants. */
static inline __attribute__((always_inline)) void attend_head(
        const float *restrict q, float *restrict out, const void *keys, const void *values,
        const uint16_t *key_scales, const uint16_t *value_scales, int64_t length,
        const int dim, int group, const int kv_dtype, float scale, float *restrict scores, float *restrict buffer) {
    for (int64_t t0 = 0; t0 < length; t0 += BLOCK) {
        const int64_t n = length - t0 < BLOCK ? length - t0 : BLOCK;
        const float *restrict k = rows_as_float(keys, t0, n, dim, kv_dtype, buffer);
        for (int r = 0; r < group; r++) {
            const float *restrict qr = q + (int64_t)r * dim;
            float *restrict s = scores + r * length + t0;
            for (int64_t t = 0; t < n; t++) {
                float dot = 0.0f;
                for (int d = 0; d < dim; d++) dot += qr[d] * k[t * dim + d];
                s[t] = dot * scale;
            }
        }
    }
    if (kv_dtype == INT8) scale_rows(scores, length, group, key_scales);
    softmax_rows(scores, length, group);
    if (kv_dtype == INT8) scale_rows(scores, length, group, value_scales);
    for (int64_t i = 0; i < (int64_t)group * dim; i++) out[i] = 0.0f;
    for (int64_t t0 = 0; t0 < length; t0 += BLOCK) {
        const int64_t n = length - t0 < BLOCK ? length - t0 : BLOCK;
        const float *restrict v = rows_as_float(values, t0, n, dim, kv_dtype, buffer);
        for (int r = 0; r < group; r++) {
            const float *restrict p = scores + r * length + t0;
            float *restrict o = out + (int64_t)r * dim;
            float acc[MAX_DIM];  /* in registers when dim is a constant */
            for (int d = 0; d < dim; d++) acc[d] = o[d];
            for (int64_t t = 0; t < n; t++)
                for (int d = 0; d < dim; d++) acc[d] += p[t] * v[t * dim + d];
            for (int d = 0; d < dim; d++) o[d] = acc[d];
        }
    }
}

/* (q, out, keys, values, key_scales, value_scales, length, dim, group, scale, scores, buffer);
 * the scales: bf16 per token of an int8 slab, NULL for the float dtypes. */
typedef void (*head_kernel)(const float *, float *, const void *, const void *, const uint16_t *, const uint16_t *,
                            int64_t, int, int, float, float *, float *);

/* One variant per (head_dim, KV dtype): constant sizes let the compiler unroll and keep
 * the accumulators in registers; other head sizes take the generic variant. */
#define VARIANT(name, DIM, DTYPE)                                                                            \
    MULTIVERSION static void name(const float *q, float *out, const void *keys, const void *values,           \
                                  const uint16_t *key_scales, const uint16_t *value_scales, int64_t length,   \
                                  int dim, int group, float scale, float *scores, float *buffer) {            \
        (void)dim;                                                                                            \
        attend_head(q, out, keys, values, key_scales, value_scales, length, DIM, group, DTYPE, scale, scores,  \
                    buffer);                                                                                  \
    }
VARIANT(head64_f32, 64, FLOAT32)
VARIANT(head64_bf16, 64, BFLOAT16)
VARIANT(head128_f32, 128, FLOAT32)
VARIANT(head128_bf16, 128, BFLOAT16)
VARIANT(head_any_f32, dim, FLOAT32)
VARIANT(head_any_bf16, dim, BFLOAT16)
VARIANT(head64_i8, 64, INT8)
VARIANT(head128_i8, 128, INT8)
VARIANT(head_any_i8, dim, INT8)

/* Ask for rows t..t+n-1 of a [length, row_bytes] slab ahead of use: with compute between
 * the loads, the core alone keeps too few cache misses in flight to stream at full speed.
 * Into every cache level (locality 3): the non-temporal hint stalled the loop on an Intel
 * Xeon, at half the bytes/s (docs/PERFORMANCE.md, "Decode attention's prefetch hint"). */
#define PREFETCH_TILES 4
static inline void prefetch_rows(const void *slab, int64_t t, int n, int row_bytes, int64_t length) {
    if (t >= length) return;
    const int64_t rows = length - t < n ? length - t : n;
    const char *first = (const char *)slab + t * row_bytes;
    for (int64_t offset = 0; offset < rows * row_bytes; offset += 64) __builtin_prefetch(first + offset, 0, 3);
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
/* The AVX-512 path, for head_dim a multiple of 16 (up to 256), chosen at run time. Its
 * q.K pass scores 16 tokens at a time and sums their 16 dot-product vectors with one
 * transposing reduction tree, instead of a horizontal sum per score, which is what bounds
 * the portable loop. */
#define AVX512 __attribute__((target("avx512f")))
#define TILE 16
#define MAX_CHUNKS (MAX_DIM / 16)

/* Lane j of the result = the sum of v[j]'s 16 lanes. */
AVX512 static inline __m512 sum_each(const __m512 v[TILE]) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [a, b, a, b] partial sums of v[2i], v[2i+1] */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: [a, b, c, d] for v[4i..4i+3] */
        const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)  /* 128-bit lanes folded in pairs */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out rows r..r+rows-1 += their probabilities of tokens t0..t0+n-1 times those tokens' V rows. */
AVX512 static inline __attribute__((always_inline)) void accumulate_values(
        float *restrict out, const float *restrict scores, int64_t length, int64_t t0, int n, const float *v, int r,
        const int rows, const int chunks) {
    const int dim = 16 * chunks;
    __m512 acc[4][MAX_CHUNKS];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < chunks; c++) acc[i][c] = _mm512_loadu_ps(out + (r + i) * dim + 16 * c);
    for (int j = 0; j < n; j++) {
        __m512 weight[4];
        for (int i = 0; i < rows; i++) weight[i] = _mm512_set1_ps(scores[(r + i) * length + t0 + j]);
        for (int c = 0; c < chunks; c++) {
            const __m512 row = _mm512_loadu_ps(v + j * dim + 16 * c);
            for (int i = 0; i < rows; i++) acc[i][c] = _mm512_fmadd_ps(weight[i], row, acc[i][c]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + (r + i) * dim + 16 * c, acc[i][c]);
}

/* attend_head's contract, with dim = 16 * chunks; buffer: TILE * dim floats. */
AVX512 static inline __attribute__((always_inline)) void attend_head_avx512(
        const float *restrict q, float *restrict out, const void *keys, const void *values,
        const uint16_t *key_scales, const uint16_t *value_scales, int64_t length,
        const int chunks, int group, const int kv_dtype, float scale, float *restrict scores, float *restrict buffer) {
    const int dim = 16 * chunks, row_element = kv_dtype == FLOAT32 ? 4 : kv_dtype == INT8 ? 1 : 2;
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        const int n = length - t0 < TILE ? (int)(length - t0) : TILE;
        prefetch_rows(keys, t0 + PREFETCH_TILES * TILE, TILE, dim * row_element, length);
        const float *k = rows_as_float(keys, t0, n, dim, kv_dtype, buffer);
        for (int r = 0; r < group; r++) {
            __m512 qr[MAX_CHUNKS], dots[TILE];
            for (int c = 0; c < chunks; c++) qr[c] = _mm512_loadu_ps(q + r * dim + 16 * c);
            for (int j = 0; j < TILE; j++) {
                __m512 dot = _mm512_setzero_ps();
                if (j < n)
                    for (int c = 0; c < chunks; c++) dot = _mm512_fmadd_ps(qr[c], _mm512_loadu_ps(k + j * dim + 16 * c), dot);
                dots[j] = dot;
            }
            _mm512_mask_storeu_ps(scores + r * length + t0, (__mmask16)((1u << n) - 1),
                                  _mm512_mul_ps(sum_each(dots), _mm512_set1_ps(scale)));
        }
    }
    if (kv_dtype == INT8) scale_rows(scores, length, group, key_scales);
    softmax_rows(scores, length, group);
    if (kv_dtype == INT8) scale_rows(scores, length, group, value_scales);
    for (int64_t i = 0; i < (int64_t)group * dim; i++) out[i] = 0.0f;
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        const int n = length - t0 < TILE ? (int)(length - t0) : TILE;
        prefetch_rows(values, t0 + PREFETCH_TILES * TILE, TILE, dim * row_element, length);
        const float *v = rows_as_float(values, t0, n, dim, kv_dtype, buffer);
        /* Several query heads per read of V: up to 16 accumulators stay in registers. */
        const int most = chunks <= 4 ? 4 : 2;
        for (int r = 0; r < group;) {
            const int rows = group - r < most ? group - r : most;
            switch (rows) {
                case 4: accumulate_values(out, scores, length, t0, n, v, r, 4, chunks); break;
                case 3: accumulate_values(out, scores, length, t0, n, v, r, 3, chunks); break;
                case 2: accumulate_values(out, scores, length, t0, n, v, r, 2, chunks); break;
                default: accumulate_values(out, scores, length, t0, n, v, r, 1, chunks); break;
            }
            r += rows;
        }
    }
}

#define VARIANT_AVX512(name, CHUNKS, DTYPE)                                                                     \
    AVX512 static void name(const float *q, float *out, const void *keys, const void *values,                   \
                            const uint16_t *key_scales, const uint16_t *value_scales, int64_t length, int dim,  \
                            int group, float scale, float *scores, float *buffer) {                             \
        attend_head_avx512(q, out, keys, values, key_scales, value_scales, length, CHUNKS, group, DTYPE, scale,  \
                           scores, buffer);                                                                     \
        (void)dim;                                                                                              \
    }
VARIANT_AVX512(avx512_head64_f32, 4, FLOAT32)
VARIANT_AVX512(avx512_head64_bf16, 4, BFLOAT16)
VARIANT_AVX512(avx512_head128_f32, 8, FLOAT32)
VARIANT_AVX512(avx512_head128_bf16, 8, BFLOAT16)
VARIANT_AVX512(avx512_head_any_f32, dim / 16, FLOAT32)
VARIANT_AVX512(avx512_head_any_bf16, dim / 16, BFLOAT16)
VARIANT_AVX512(avx512_head64_i8, 4, INT8)
VARIANT_AVX512(avx512_head128_i8, 8, INT8)
VARIANT_AVX512(avx512_head_any_i8, dim / 16, INT8)

/* The bfloat16 path for CPUs with AVX512_BF16 (head_dim a multiple of 32): vdpbf16ps
 * multiplies pairs of bf16 values into float32 sums, so neither pass converts the cache
 * and each instruction does twice the work of an FMA. q.K takes q as bf16 (it arrived as
 * bf16); p.V takes the probabilities rounded to bf16, as torch's bf16 attention does. */
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* out rows r..r+rows-1 = their bf16 probabilities (rows `stride` apart) times V. Tokens go
 * in pairs (t, t+1), interleaved so that each float32 lane sums both; the accumulators
 * hold the dims in the order unpacklo/unpackhi leave them, put back at the end. */
AVX512BF16 static inline __attribute__((always_inline)) void accumulate_pairs(
        float *restrict out, const uint16_t *restrict probabilities, int64_t stride, const uint16_t *v,
        int64_t length, int r, const int rows, const int pairs) {
    const int dim = 32 * pairs;
    __m512 acc[4][MAX_DIM / 16];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < 2 * pairs; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 2) {
        prefetch_rows(v, t + PREFETCH_TILES * TILE, 2, dim * 2, length);
        __m512bh weight[4];
        for (int i = 0; i < rows; i++) {
            uint32_t both;  /* the bf16 probabilities of t and t+1 */
            memcpy(&both, probabilities + (r + i) * stride + t, sizeof both);
            weight[i] = (__m512bh)_mm512_set1_epi32((int)both);
        }
        for (int c = 0; c < pairs; c++) {
            const __m512i first = _mm512_loadu_si512(v + t * dim + 32 * c);
            const __m512i second = t + 1 < length ? _mm512_loadu_si512(v + (t + 1) * dim + 32 * c) : _mm512_setzero_si512();
            const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(first, second);
            const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(first, second);
            for (int i = 0; i < rows; i++) {
                acc[i][2 * c] = _mm512_dpbf16_ps(acc[i][2 * c], low, weight[i]);
                acc[i][2 * c + 1] = _mm512_dpbf16_ps(acc[i][2 * c + 1], high, weight[i]);
            }
        }
    }
    /* Per 128-bit lane L: the low accumulator holds dims 8L..8L+3, the high one 8L+4..8L+7. */
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < pairs; c++) {
            float *o = out + (r + i) * dim + 32 * c;
            _mm512_storeu_ps(o, _mm512_permutex2var_ps(acc[i][2 * c], first_half, acc[i][2 * c + 1]));
            _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(acc[i][2 * c], second_half, acc[i][2 * c + 1]));
        }
}

/* attend_head's contract, with dim = 32 * pairs and bf16 keys and values; `probabilities`:
 * scratch of group * (length + 2) bf16 values. */
AVX512BF16 static inline __attribute__((always_inline)) void attend_head_bf16dp(
        const float *restrict q, float *restrict out, const void *keys, const void *values, int64_t length,
        const int pairs, int group, float scale, float *restrict scores, uint16_t *restrict probabilities) {
    const int dim = 32 * pairs;
    const uint16_t *k = keys, *v = values;
    const int64_t stride = (length + 2) & ~(int64_t)1;  /* per row of probabilities: even, with a zero pad */
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        const int n = length - t0 < TILE ? (int)(length - t0) : TILE;
        prefetch_rows(k, t0 + PREFETCH_TILES * TILE, TILE, dim * 2, length);
        for (int r = 0; r < group; r++) {
            __m512bh qr[MAX_CHUNKS / 2];
            __m512 dots[TILE];
            for (int c = 0; c < pairs; c++)
                qr[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + r * dim + 32 * c + 16), _mm512_loadu_ps(q + r * dim + 32 * c));
            for (int j = 0; j < TILE; j++) {
                __m512 dot = _mm512_setzero_ps();
                if (j < n)
                    for (int c = 0; c < pairs; c++)
                        dot = _mm512_dpbf16_ps(dot, qr[c], (__m512bh)_mm512_loadu_si512(k + (t0 + j) * dim + 32 * c));
                dots[j] = dot;
            }
            _mm512_mask_storeu_ps(scores + r * length + t0, (__mmask16)((1u << n) - 1),
                                  _mm512_mul_ps(sum_each(dots), _mm512_set1_ps(scale)));
        }
    }
    softmax_rows(scores, length, group);
    for (int r = 0; r < group; r++) {
        uint16_t *row = probabilities + r * stride;
        for (int64_t t = 0; t < length; t += 16) {
            const __mmask16 live = length - t >= 16 ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
            const __m512 p = _mm512_maskz_loadu_ps(live, scores + r * length + t);
            _mm256_mask_storeu_epi16(row + t, live, (__m256i)_mm512_cvtneps_pbh(p));
        }
        row[length] = row[stride - 1] = 0;  /* an odd last token pairs with a zero weight */
    }
    const int most = pairs <= 2 ? 4 : 2;  /* query heads per pass over V: up to 16 accumulators */
    for (int r = 0; r < group;) {
        const int rows = group - r < most ? group - r : most;
        switch (rows) {
            case 4: accumulate_pairs(out, probabilities, stride, v, length, r, 4, pairs); break;
            case 3: accumulate_pairs(out, probabilities, stride, v, length, r, 3, pairs); break;
            case 2: accumulate_pairs(out, probabilities, stride, v, length, r, 2, pairs); break;
            default: accumulate_pairs(out, probabilities, stride, v, length, r, 1, pairs); break;
        }
        r += rows;
    }
}

#define VARIANT_BF16DP(name, PAIRS)                                                                           \
    AVX512BF16 static void name(const float *q, float *out, const void *keys, const void *values,              \
                                const uint16_t *key_scales, const uint16_t *value_scales, int64_t length,      \
                                int dim, int group, float scale, float *scores, float *buffer) {               \
        attend_head_bf16dp(q, out, keys, values, length, PAIRS, group, scale, scores, (uint16_t *)buffer);     \
        (void)dim, (void)key_scales, (void)value_scales;                                                       \
    }
VARIANT_BF16DP(bf16dp_head64, 2)
VARIANT_BF16DP(bf16dp_head128, 4)
VARIANT_BF16DP(bf16dp_head_any, dim / 32)
#endif

#include "_kvint8.h"


/* Instruction-set levels a caller may cap the decode kernel at (tests use the lower levels
 * to cover every path on one machine). */
enum { LEVEL_PORTABLE = 0, LEVEL_AVX512F = 1, LEVEL_AVX512_BF16 = 2 };

/* The fastest kernel this CPU runs, up to level `widest` (LEVEL_AVX512_BF16 is AVX512_VNNI
 * for int8 caches). */
static head_kernel pick_kernel(int dim, int kv_dtype, int widest) {
    const int bf16 = kv_dtype == BFLOAT16, i8 = kv_dtype == INT8;
#ifdef HAVE_AVX512_PATH
    if (widest >= LEVEL_AVX512_BF16 && i8 && dim % 32 == 0 && int8_vnni_cpu_ok()) {
        if (dim == 64) return vnni_head64;
        if (dim == 128) return vnni_head128;
        return vnni_head_any;
    }
    if (widest >= LEVEL_AVX512_BF16 && bf16 && dim % 32 == 0 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        if (dim == 64) return bf16dp_head64;
        if (dim == 128) return bf16dp_head128;
        return bf16dp_head_any;
    }
    if (widest >= LEVEL_AVX512F && dim % 16 == 0 && __builtin_cpu_supports("avx512f")) {
        if (dim == 64) return i8 ? avx512_head64_i8 : bf16 ? avx512_head64_bf16 : avx512_head64_f32;
        if (dim == 128) return i8 ? avx512_head128_i8 : bf16 ? avx512_head128_bf16 : avx512_head128_f32;
        return i8 ? avx512_head_any_i8 : bf16 ? avx512_head_any_bf16 : avx512_head_any_f32;
    }
#endif
    if (dim == 64) return i8 ? head64_i8 : bf16 ? head64_bf16 : head64_f32;
    if (dim == 128) return i8 ? head128_i8 : bf16 ? head128_bf16 : head128_f32;
    return i8 ? head_any_i8 : bf16 ? head_any_bf16 : head_any_f32;
}

/* The first rows of the next work item's slabs, asked for while this one computes: at short
 * contexts a slab is a few KiB and would otherwise start with a run of cache misses. */
#define NEXT_ITEM_ROWS 32

/* decode_attention(q, out, new_keys, new_values, keys, values, key_scales, value_scales,
 *                  bases, lengths, slices, count, heads, kv_heads, head_dim, head_stride,
 *                  scale_stride, kv_dtype, q_dtype, scale, widest)
 *
 * q, out: [sequences, heads, head_dim] in q_dtype (float32 or bfloat16), addresses as ints.
 * new_keys, new_values: 0, or [sequences, kv_heads, head_dim] in kv_dtype (an int8 cache:
 *   in q_dtype, quantized here): each sequence's newest token, written to its row
 *   lengths[seq] - 1 before it is attended.
 * keys, values: one layer of the store, [kv_heads, capacity, head_dim] with KV heads
 *   head_stride elements apart, float32, bfloat16 or int8 (kv_dtype).
 * key_scales, value_scales: an int8 cache's bf16 scales, [kv_heads, capacity] with KV
 *   heads scale_stride apart (row t of head g holds its values times scale (g, t)); 0 else.
 * bases, lengths: int64 per sequence: its first buffer row and its cached length (>= 1).
 * Work items are (sequence, KV head) pairs, item = seq * kv_heads + g; an item writes and
 *   reads only its own rows, so slices may run on several threads. slices: int64
 *   [count][2], each slice's first and last (exclusive) item (see run_slices).
 * widest: the widest instruction set to use (see pick_kernel).
 */
typedef struct {
    const char *q, *new_keys, *new_values;
    char *out, *keys, *values;
    uint16_t *key_scales, *value_scales;
    const int64_t *bases, *lengths;
    int64_t head_stride, scale_stride;
    int heads, kv_heads, dim, kv_dtype, q_dtype;
    float scale;
    head_kernel kernel;
} decode_args;

static inline size_t element_size(int dtype) { return dtype == FLOAT32 ? 4 : dtype == INT8 ? 1 : 2; }

/* Item `item`'s new K/V row written at row `row` of its slabs (an int8 cache: quantized,
 * its scales at `scale_offset`). */
static inline void append_row(const decode_args *a, int64_t item, char *key_slab, char *value_slab, int64_t row,
                              size_t scale_offset) {
    if (a->kv_dtype == INT8) {
        const size_t source = (size_t)item * (size_t)a->dim * element_size(a->q_dtype);
        quantize_row(a->new_keys + source, a->q_dtype, a->dim, (int8_t *)key_slab + row * a->dim,
                     a->key_scales + scale_offset + row);
        quantize_row(a->new_values + source, a->q_dtype, a->dim, (int8_t *)value_slab + row * a->dim,
                     a->value_scales + scale_offset + row);
        return;
    }
    const size_t row_bytes = (size_t)a->dim * element_size(a->kv_dtype);
    memcpy(key_slab + row * row_bytes, a->new_keys + (size_t)item * row_bytes, row_bytes);
    memcpy(value_slab + row * row_bytes, a->new_values + (size_t)item * row_bytes, row_bytes);
}

/* decode_attention's work items first..last-1 (see there). */
static int decode_items(const void *args, int64_t first_item, int64_t last_item) {
    const decode_args *a = args;
    const int group = a->heads / a->kv_heads;
    const size_t element = element_size(a->kv_dtype), q_element = element_size(a->q_dtype);
    const size_t row_bytes = (size_t)a->dim * element;
    int64_t longest = 1;
    for (int64_t item = first_item; item < last_item; item++)
        if (a->lengths[item / a->kv_heads] > longest) longest = a->lengths[item / a->kv_heads];
    /* scores, then a buffer for converted K/V rows or bf16 probabilities, whichever is larger
     * (plus, for the int8 kernel, the group's int16 q rows, two scales per row and alignment:
     * see attend_head_vnni), then float32 copies of the group's q and out rows when q is not
     * float32 */
    const size_t group_floats = (size_t)group * a->dim;
    const size_t buffer = ((size_t)BLOCK * a->dim > (size_t)group * (longest + 2) ? (size_t)BLOCK * a->dim
                                                                                  : (size_t)group * (longest + 2))
                          + group_floats + 2 * (size_t)group + 16;
    const size_t scores = (size_t)group * (size_t)longest;
    float *scratch = malloc(sizeof(float) * (scores + buffer + (a->q_dtype == FLOAT32 ? 0 : 2 * group_floats)));
    if (scratch == NULL) return -1;
    float *q_rows = scratch + scores + buffer, *out_rows = q_rows + group_floats;
    for (int64_t item = first_item; item < last_item; item++) {
        const int64_t seq = item / a->kv_heads, g = item % a->kv_heads, length = a->lengths[seq];
        const size_t offset = ((size_t)g * (size_t)a->head_stride + (size_t)a->bases[seq] * (size_t)a->dim) * element;
        const size_t scale_offset = (size_t)g * (size_t)a->scale_stride + (size_t)a->bases[seq];
        char *key_slab = a->keys + offset, *value_slab = a->values + offset;
        const uint16_t *key_scales = a->kv_dtype == INT8 ? a->key_scales + scale_offset : NULL;
        const uint16_t *value_scales = a->kv_dtype == INT8 ? a->value_scales + scale_offset : NULL;
        if (item + 1 < last_item) {
            const int64_t next = (item + 1) / a->kv_heads, next_g = (item + 1) % a->kv_heads;
            const size_t next_offset =
                ((size_t)next_g * (size_t)a->head_stride + (size_t)a->bases[next] * (size_t)a->dim) * element;
            prefetch_rows(a->keys + next_offset, 0, NEXT_ITEM_ROWS, (int)row_bytes, a->lengths[next]);
            prefetch_rows(a->values + next_offset, 0, NEXT_ITEM_ROWS, (int)row_bytes, a->lengths[next]);
        }
        if (a->new_keys != NULL) append_row(a, item, key_slab, value_slab, length - 1, scale_offset);
        const int64_t first_element = (seq * a->heads + g * group) * (int64_t)a->dim;
        const void *q = a->q + first_element * q_element;
        void *out = a->out + first_element * q_element;
        if (a->q_dtype == FLOAT32) {
            a->kernel(q, out, key_slab, value_slab, key_scales, value_scales, length, a->dim, group, a->scale,
                      scratch + buffer, scratch);
        } else {
            for (size_t i = 0; i < group_floats; i++) q_rows[i] = load(q, i, BFLOAT16);
            a->kernel(q_rows, out_rows, key_slab, value_slab, key_scales, value_scales, length, a->dim, group,
                      a->scale, scratch + buffer, scratch);
            for (size_t i = 0; i < group_floats; i++) store(out, i, out_rows[i], BFLOAT16);
        }
    }
    free(scratch);
    return 0;
}

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q_addr, out_addr, new_keys_addr, new_values_addr, keys_addr, values_addr, key_scales_addr,
        value_scales_addr, bases_addr, lengths_addr, slices_addr;
    Py_ssize_t head_stride, scale_stride;
    int heads, kv_heads, dim, kv_dtype, q_dtype, widest, count;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKiiiinniifi", &q_addr, &out_addr, &new_keys_addr, &new_values_addr,
                          &keys_addr, &values_addr, &key_scales_addr, &value_scales_addr, &bases_addr, &lengths_addr,
                          &slices_addr, &count, &heads, &kv_heads, &dim, &head_stride, &scale_stride, &kv_dtype,
                          &q_dtype, &scale, &widest))
        return NULL;
    if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || dim > MAX_DIM
        || (kv_dtype != FLOAT32 && kv_dtype != BFLOAT16 && kv_dtype != INT8) || (q_dtype != FLOAT32 && q_dtype != BFLOAT16)
        || (kv_dtype == INT8 && (key_scales_addr == 0 || value_scales_addr == 0)) || count <= 0) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad geometry, dtype, scales or slices");
        return NULL;
    }
    const decode_args a = {(const char *)(uintptr_t)q_addr, (const char *)(uintptr_t)new_keys_addr,
                           (const char *)(uintptr_t)new_values_addr, (char *)(uintptr_t)out_addr,
                           (char *)(uintptr_t)keys_addr, (char *)(uintptr_t)values_addr,
                           (uint16_t *)(uintptr_t)key_scales_addr, (uint16_t *)(uintptr_t)value_scales_addr,
                           (const int64_t *)(uintptr_t)bases_addr, (const int64_t *)(uintptr_t)lengths_addr,
                           head_stride, scale_stride, heads, kv_heads, dim, kv_dtype, q_dtype, scale,
                           pick_kernel(dim, kv_dtype, widest)};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_slices(decode_items, &a, (const int64_t *)(uintptr_t)slices_addr, count);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- Causal prefill over a bfloat16 cache (AVX512_BF16 only) ----------------------------
 *
 * A prompt chunk of n tokens at positions start..start+n-1 attends over the sequence's
 * first start+n cached tokens, each query causally. Compute-bound, unlike decode: both
 * products go through vdpbf16ps with no reduction across lanes. pack_kv first lays out
 * one sequence's keys and values (all KV heads) so that a 512-bit load serves 16 keys
 * (K: pair p of dims of 16 consecutive keys) or 16 dims (V: dims d of 2 consecutive keys),
 * then prefill_attention takes blocks of 4 query rows (of the `group` heads that share a
 * KV head, position-major): scores against every visible key in float32, then e^(score -
 * max) rounded to bf16 in one pass, then p.V divided by the sum. Work items are (KV
 * head, block of PREFILL_POSITIONS positions). */
#define PREFILL_ROWS 4         /* query rows per pass over K and V */
#define PREFILL_TILES 4        /* 16-key tiles per step of the q.K pass */
#define PREFILL_POSITIONS 16   /* positions per work item */
#define PREFILL_DIM_MULTIPLE 32 /* head_dim: whole 32-dim chunks (bf16 pairs of 16 lanes) */

/* 16-key tiles covering `length` keys, rounded up to a multiple of PREFILL_TILES (the q.K
 * pass's step); pack_kv pads the packed keys to this many. */
static inline int64_t key_tiles(int64_t length) {
    return (length + 16 * PREFILL_TILES - 1) / (16 * PREFILL_TILES) * PREFILL_TILES;
}

#ifdef HAVE_AVX512_PATH
static int prefill_cpu_ok(void) {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Scores of `rows` query rows (bf16 pairs `q[r]`) against key tiles 0..tiles-1 (tiles a
 * multiple of PREFILL_TILES), times scale, into scores[r * stride + key]. */
AVX512BF16 static void prefill_scores(const uint32_t *const q[PREFILL_ROWS], const uint32_t *keys, int64_t tiles,
                                      int pairs, float scale, float *scores, int64_t stride) {
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < tiles; t0 += PREFILL_TILES) {
        __m512 acc[PREFILL_ROWS][PREFILL_TILES];
        for (int r = 0; r < PREFILL_ROWS; r++)
            for (int t = 0; t < PREFILL_TILES; t++) acc[r][t] = _mm512_setzero_ps();
        for (int p = 0; p < pairs; p++) {
            __m512i k[PREFILL_TILES];
            for (int t = 0; t < PREFILL_TILES; t++) k[t] = _mm512_loadu_si512(keys + ((t0 + t) * pairs + p) * 16);
            for (int r = 0; r < PREFILL_ROWS; r++) {
                const __m512bh qr = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
                for (int t = 0; t < PREFILL_TILES; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)k[t], qr);
            }
        }
        for (int r = 0; r < PREFILL_ROWS; r++)
            for (int t = 0; t < PREFILL_TILES; t++)
                _mm512_storeu_ps(scores + r * stride + (t0 + t) * 16, _mm512_mul_ps(acc[r][t], scaled));
    }
}

/* Row r of `scores`: e^(score - its maximum) over its first lengths[r] entries, as bf16
 * pairs in probabilities[r * pair_stride ..] (0 from lengths[r] up to `pairs_used` pairs);
 * inverse_sums[r] = 1 / their sum, applied to the output instead (one pass per row). e^x
 * is 2^(x log2 e) with a degree-4 polynomial on [-1/2, 1/2]: about 4e-5 relative, well
 * inside the bf16 rounding that follows. */
AVX512BF16 static void prefill_softmax(const float *scores, int64_t stride, const int64_t lengths[PREFILL_ROWS],
                                       uint32_t *probabilities, int64_t pair_stride, int64_t pairs_used,
                                       float inverse_sums[PREFILL_ROWS]) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), floor = _mm512_set1_ps(-126.0f);
    const __m512 c1 = _mm512_set1_ps(0.693147181f), c2 = _mm512_set1_ps(0.240226507f);
    const __m512 c3 = _mm512_set1_ps(0.0555041087f), c4 = _mm512_set1_ps(0.00961812911f), one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < PREFILL_ROWS; r++) {
        const float *s = scores + r * stride;
        const int64_t length = lengths[r];
        __m512 highest = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < length; t += 16) {
            const __mmask16 live = length - t >= 16 ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
            highest = _mm512_mask_max_ps(highest, live, highest, _mm512_maskz_loadu_ps(live, s + t));
        }
        const __m512 shift = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(highest)), log2e);
        __m512 total = _mm512_setzero_ps();
        uint16_t *row = (uint16_t *)(probabilities + r * pair_stride);
        for (int64_t t = 0; t < 2 * pairs_used; t += 16) {
            const __mmask16 live = length - t >= 16 ? 0xFFFF : length > t ? (__mmask16)((1u << (length - t)) - 1) : 0;
            const __m512 y = _mm512_max_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, s + t), log2e, shift), floor);
            const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 f = _mm512_sub_ps(y, n);
            __m512 p = _mm512_fmadd_ps(f, c4, c3);
            p = _mm512_fmadd_ps(p, f, c2);
            p = _mm512_fmadd_ps(p, f, c1);
            p = _mm512_fmadd_ps(p, f, one);
            p = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
            total = _mm512_add_ps(total, p);
            const __mmask16 stored = 2 * pairs_used - t >= 16 ? 0xFFFF : (__mmask16)((1u << (2 * pairs_used - t)) - 1);
            _mm256_mask_storeu_epi16(row + t, stored, (__m256i)_mm512_cvtneps_pbh(p));
        }
        inverse_sums[r] = 1.0f / _mm512_reduce_add_ps(total);
    }
}

/* out rows (bf16, `out[r]`) = probabilities (bf16 pairs) x V over `pairs_used` key pairs;
 * `rows` of them at a time with chunks = head_dim / 16 accumulators each. */
AVX512BF16 static inline __attribute__((always_inline)) void prefill_values(
        const uint32_t *probabilities, int64_t pair_stride, const uint32_t *values, int64_t pairs_used,
        const float inverse_sums[PREFILL_ROWS], uint16_t *const out[PREFILL_ROWS], const int rows, const int chunks) {
    const int dim = 16 * chunks;
    for (int r0 = 0; r0 < PREFILL_ROWS; r0 += rows) {
        __m512 acc[PREFILL_ROWS][MAX_DIM / 16];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < pairs_used; j++) {
            __m512i v[MAX_DIM / 16];
            for (int c = 0; c < chunks; c++) v[c] = _mm512_loadu_si512(values + j * dim + 16 * c);
            for (int r = 0; r < rows; r++) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32((int)probabilities[(r0 + r) * pair_stride + j]);
                for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)v[c], p);
            }
        }
        for (int r = 0; r < rows; r++)
            if (out[r0 + r] != NULL) {
                const __m512 scale = _mm512_set1_ps(inverse_sums[r0 + r]);
                for (int c = 0; c < chunks; c++)
                    _mm256_storeu_si256((__m256i *)(out[r0 + r] + 16 * c),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], scale)));
            }
    }
}

typedef struct {
    const uint16_t *q;
    uint16_t *out;
    const uint32_t *keys, *values;   /* packed by pack_kv */
    int64_t start, n, tiles, pairs_total, pair_stride;  /* pair_stride: pairs_total rounded up to 8 */
    int heads, kv_heads, dim;
    float scale;
} prefill_args;

/* Work items first..last-1 of prefill_attention (see there). scores: PREFILL_ROWS *
 * 16 * tiles floats; probabilities: PREFILL_ROWS * pair_stride pairs. */
AVX512BF16 static void prefill_items_with(const prefill_args *a, int64_t first, int64_t last, float *scores,
                                          uint32_t *probabilities) {
    const int group = a->heads / a->kv_heads, pairs = a->dim / 2, chunks = a->dim / 16;
    const int64_t blocks = (a->n + PREFILL_POSITIONS - 1) / PREFILL_POSITIONS, stride = 16 * a->tiles;
    for (int64_t item = first; item < last; item++) {
        const int64_t g = item / blocks, first_position = (item % blocks) * PREFILL_POSITIONS;
        const int64_t positions = a->n - first_position < PREFILL_POSITIONS ? a->n - first_position : PREFILL_POSITIONS;
        const uint32_t *keys = a->keys + g * a->tiles * pairs * 16, *values = a->values + g * a->pairs_total * a->dim;
        for (int64_t row = 0; row < positions * group; row += PREFILL_ROWS) {
            const uint32_t *q[PREFILL_ROWS];
            uint16_t *out[PREFILL_ROWS];
            int64_t lengths[PREFILL_ROWS], longest = 0;
            for (int r = 0; r < PREFILL_ROWS; r++) {
                const int64_t index = row + r < positions * group ? row + r : positions * group - 1;
                const int64_t i = first_position + index / group, head = g * group + index % group;
                q[r] = (const uint32_t *)(a->q + (i * a->heads + head) * a->dim);
                out[r] = row + r < positions * group ? a->out + (i * a->heads + head) * a->dim : NULL;
                lengths[r] = a->start + i + 1;
                longest = lengths[r] > longest ? lengths[r] : longest;
            }
            const int64_t tiles = key_tiles(longest);
            const int64_t pairs_used = (longest + 1) / 2;
            prefill_scores(q, keys, tiles, pairs, a->scale, scores, stride);
            float inverse_sums[PREFILL_ROWS];
            prefill_softmax(scores, stride, lengths, probabilities, a->pair_stride, pairs_used, inverse_sums);
            switch (chunks) {
                case 4: prefill_values(probabilities, a->pair_stride, values, pairs_used, inverse_sums, out, 4, 4); break;
                case 8: prefill_values(probabilities, a->pair_stride, values, pairs_used, inverse_sums, out, 2, 8); break;
                default: prefill_values(probabilities, a->pair_stride, values, pairs_used, inverse_sums, out, 1, chunks); break;
            }
        }
    }
}

/* prefill_items_with, with its own scratch (a slice_fn). */
static int prefill_items(const void *args, int64_t first, int64_t last) {
    const prefill_args *a = args;
    float *scores = malloc(sizeof(float) * PREFILL_ROWS * 16 * (size_t)a->tiles);
    uint32_t *probabilities = malloc(sizeof(uint32_t) * PREFILL_ROWS * (size_t)a->pair_stride);
    const int status = scores != NULL && probabilities != NULL ? 0 : -1;
    if (status == 0) prefill_items_with(a, first, last, scores, probabilities);
    free(scores);
    free(probabilities);
    return status;
}
#endif

/* One KV head's keys and values (bf16, `dim` apart per token) in pack_kv's layout. */
static void pack_head_bf16(const uint16_t *k, const uint16_t *v, uint32_t *pk, uint32_t *pv, int64_t length,
                           int64_t tiles, int dim) {
    const int pairs = dim / 2;
    for (int64_t t = 0; t < tiles * 16; t++)
        for (int p = 0; p < pairs; p++) {
            uint32_t pair = 0;
            if (t < length) memcpy(&pair, k + t * dim + 2 * p, sizeof pair);
            pk[((t / 16) * pairs + p) * 16 + t % 16] = pair;
        }
    for (int64_t j = 0; j < (length + 1) / 2; j++)
        for (int d = 0; d < dim; d++) {
            const uint32_t low = v[2 * j * dim + d], high = 2 * j + 1 < length ? v[(2 * j + 1) * dim + d] : 0;
            pv[j * dim + d] = low | high << 16;
        }
}

/* Value (t, d) of an int8 slab times its row's scale, as bf16 bits (the prefill kernel
 * multiplies bf16). */
static inline uint32_t int8_as_bf16(const int8_t *slab, const uint16_t *scales, int64_t t, int d, int dim) {
    return float_to_bf16((float)slab[t * dim + d] * bf16_to_float(scales[t]));
}

/* pack_head_bf16 for an int8 KV head with its scales: dequantized as it is packed. */
static void pack_head_int8(const int8_t *k, const int8_t *v, const uint16_t *ks, const uint16_t *vs, uint32_t *pk,
                           uint32_t *pv, int64_t length, int64_t tiles, int dim) {
    const int pairs = dim / 2;
    for (int64_t t = 0; t < tiles * 16; t++)
        for (int p = 0; p < pairs; p++)
            pk[((t / 16) * pairs + p) * 16 + t % 16] =
                t < length ? int8_as_bf16(k, ks, t, 2 * p, dim) | int8_as_bf16(k, ks, t, 2 * p + 1, dim) << 16 : 0;
    for (int64_t j = 0; j < (length + 1) / 2; j++)
        for (int d = 0; d < dim; d++)
            pv[j * dim + d] = int8_as_bf16(v, vs, 2 * j, d, dim)
                              | (2 * j + 1 < length ? int8_as_bf16(v, vs, 2 * j + 1, d, dim) << 16 : 0);
}

/* pack_kv(keys, values, key_scales, value_scales, packed_keys, packed_values, length,
 *         kv_heads, head_dim, head_stride, scale_stride)
 *
 * keys, values: bf16, or int8 with bf16 scales (key_scales, value_scales non-zero: element
 *   (g, t) at g * scale_stride + t), one sequence's slab in one layer: element (g, t, d) at
 *   g * head_stride + t * head_dim + d, for t < length.
 * packed_keys: uint32 [kv_heads][tiles][head_dim / 2][16], tiles = ceil(length / 16) rounded up
 *   to a multiple of PREFILL_TILES; entry (g, T, p, j) = dims 2p, 2p+1 of key 16T + j (0 past length).
 * packed_values: uint32 [kv_heads][ceil(length / 2)][head_dim]; entry (g, j, d) = dim d of keys
 *   2j (low half) and 2j + 1 (high half, 0 past length).
 * An int8 cache is dequantized here, once per chunk: the kernel then runs as on bf16.
 */
static PyObject *pack_kv(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long keys_addr, values_addr, key_scales_addr, value_scales_addr, packed_keys_addr, packed_values_addr;
    Py_ssize_t length, head_stride, scale_stride;
    int kv_heads, dim;
    if (!PyArg_ParseTuple(args, "KKKKKKniinn", &keys_addr, &values_addr, &key_scales_addr, &value_scales_addr,
                          &packed_keys_addr, &packed_values_addr, &length, &kv_heads, &dim, &head_stride,
                          &scale_stride))
        return NULL;
    const char *keys = (const char *)(uintptr_t)keys_addr, *values = (const char *)(uintptr_t)values_addr;
    const uint16_t *key_scales = (const uint16_t *)(uintptr_t)key_scales_addr;
    const uint16_t *value_scales = (const uint16_t *)(uintptr_t)value_scales_addr;
    uint32_t *packed_keys = (uint32_t *)(uintptr_t)packed_keys_addr, *packed_values = (uint32_t *)(uintptr_t)packed_values_addr;
    const int64_t tiles = key_tiles(length), pairs_total = (length + 1) / 2;
    Py_BEGIN_ALLOW_THREADS
    for (int g = 0; g < kv_heads; g++) {
        uint32_t *pk = packed_keys + (int64_t)g * tiles * (dim / 2) * 16, *pv = packed_values + (int64_t)g * pairs_total * dim;
        if (key_scales == NULL)
            pack_head_bf16((const uint16_t *)keys + g * head_stride, (const uint16_t *)values + g * head_stride, pk, pv,
                           length, tiles, dim);
        else
            pack_head_int8((const int8_t *)keys + g * head_stride, (const int8_t *)values + g * head_stride,
                           key_scales + g * scale_stride, value_scales + g * scale_stride, pk, pv, length, tiles, dim);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* prefill_attention(q, out, packed_keys, packed_values, start, n, heads, kv_heads, head_dim,
 *                   scale, slices, count)
 *
 * q, out: bf16 [n, heads, head_dim], positions start..start+n-1 of one sequence whose first
 *   start + n keys and values pack_kv packed. Query i sees keys 0..start+i.
 * Work items: item = g * blocks + b, b the block of positions PREFILL_POSITIONS * b.. of KV
 *   head g's query heads; each writes only its own rows of out. slices: int64 [count][2],
 *   as for decode_attention.
 * Needs head_dim a multiple of PREFILL_DIM_MULTIPLE (at most MAX_DIM) and prefill_supported().
 */
static PyObject *prefill_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q_addr, out_addr, keys_addr, values_addr, slices_addr;
    Py_ssize_t start, n;
    int heads, kv_heads, dim, count;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKnniiifKi", &q_addr, &out_addr, &keys_addr, &values_addr, &start, &n, &heads,
                          &kv_heads, &dim, &scale, &slices_addr, &count))
        return NULL;
#ifdef HAVE_AVX512_PATH
    if (!prefill_cpu_ok() || kv_heads <= 0 || heads % kv_heads != 0 || dim % PREFILL_DIM_MULTIPLE != 0 || dim > MAX_DIM
        || count <= 0) {
        PyErr_SetString(PyExc_ValueError, "prefill_attention: unsupported CPU, geometry or slices");
        return NULL;
    }
    const int64_t length = start + n;
    const prefill_args a = {(const uint16_t *)(uintptr_t)q_addr, (uint16_t *)(uintptr_t)out_addr,
                            (const uint32_t *)(uintptr_t)keys_addr, (const uint32_t *)(uintptr_t)values_addr, start, n,
                            key_tiles(length), (length + 1) / 2,
                            ((length + 1) / 2 + 7) / 8 * 8, heads, kv_heads, dim, scale};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_slices(prefill_items, &a, (const int64_t *)(uintptr_t)slices_addr, count);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)q_addr, (void)out_addr, (void)keys_addr, (void)values_addr, (void)start, (void)n, (void)heads;
    (void)kv_heads, (void)dim, (void)scale, (void)slices_addr, (void)count;
    PyErr_SetString(PyExc_ValueError, "prefill_attention: not built for this CPU");
    return NULL;
#endif
}

/* packed_kv_words(length, head_dim) -> (key_words, value_words): the uint32 words pack_kv
 * writes per KV head, for the caller to allocate. */
static PyObject *packed_kv_words(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t length;
    int dim;
    if (!PyArg_ParseTuple(args, "ni", &length, &dim)) return NULL;
    if (length < 0 || dim <= 0 || dim % 2 != 0) {
        PyErr_SetString(PyExc_ValueError, "packed_kv_words: length must be >= 0 and head_dim even and positive");
        return NULL;
    }
    return Py_BuildValue("LL", (long long)(key_tiles(length) * 16 * (dim / 2)), (long long)((length + 1) / 2 * dim));
}

/* prefill_supported() -> bool: whether this CPU runs prefill_attention (AVX512_BF16). */
static PyObject *prefill_supported(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
#ifdef HAVE_AVX512_PATH
    return PyBool_FromLong(prefill_cpu_ok());
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS, "Fused decode attention over slices of work items."},
    {"use_openmp", use_openmp, METH_VARARGS, "Run slices as parallel regions of this OpenMP runtime."},
    {"pack_kv", pack_kv, METH_VARARGS, "Lay out one sequence's bf16 (or int8) keys and values for prefill_attention."},
    {"prefill_attention", prefill_attention, METH_VARARGS, "Causal bf16 prefill attention over slices of work items."},
    {"packed_kv_words", packed_kv_words, METH_VARARGS, "uint32 words pack_kv writes per KV head: (keys, values)."},
    {"prefill_supported", prefill_supported, METH_NOARGS, "Whether this CPU runs prefill_attention."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__attention(void) {
    static const int_constant constants[] = {
        {"MAX_DIM", MAX_DIM},
        {"LEVEL_PORTABLE", LEVEL_PORTABLE},
        {"LEVEL_AVX512F", LEVEL_AVX512F},
        {"LEVEL_AVX512_BF16", LEVEL_AVX512_BF16},
        {"PREFILL_POSITIONS", PREFILL_POSITIONS},
        {"PREFILL_DIM_MULTIPLE", PREFILL_DIM_MULTIPLE},
        {NULL, 0},
    };
    return create_module(&module, constants);
}
