/* The per-head decode kernels of _attention.c (float32, bfloat16 and int8 caches on the
 * portable and AVX-512F paths; bfloat16 on AVX512_BF16), included once by _attention.c:
 * every kernel has attend_head's contract and pick_kernel there chooses one per call. */
#ifndef GLINTHAWK_DECODE_KERNELS_H
#define GLINTHAWK_DECODE_KERNELS_H

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

#include "_softmax16.h"

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
    softmax_rows16(scores, length, group);
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
    for (int r = 0; r < group; r++) {  /* the softmax, its division fused with the rounding to bf16 */
        uint16_t *row = probabilities + r * stride;
        const __m512 inverse = _mm512_set1_ps(1.0f / exp_row(scores + r * length, length));
        for (int64_t t = 0; t < length; t += 16) {
            const __mmask16 live = lanes_before(t, length);
            const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, scores + r * length + t), inverse);
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

#endif
