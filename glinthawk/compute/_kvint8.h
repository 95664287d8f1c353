/* Int8 KV caches, for _attention.c (included after its float kernels).
 *
 * Each cached row (one token, one KV head) is head_dim int8 values and one bf16 scale:
 * value = int8 * scale. Per-token, per-head scales follow each row's own range (keys after
 * RoPE differ a lot from head to head), and a bf16 scale costs 2 bytes a row where float32
 * would cost 4: at head_dim 32 that is the difference between 1.88x and 1.78x the tokens
 * of a bf16 cache in the same memory. The scale is the row's largest magnitude / 127
 * rounded *up* to a bf16: stored exactly, and no value rounds past +-127.
 * glinthawk/compute/kvquant.py does the same arithmetic in torch, bit for bit (a test
 * holds them together): rows the decode kernel appends and rows torch writes are alike.
 *
 * Decode reads K and V once, as the float kernels do; an int8 row's scale multiplies its
 * score (K) or its probability (V), once per token, not once per element. With AVX512_VNNI
 * the q.K pass runs on vpdpwssd: q rounded to int16 (2^-16 of its row's largest entry, far
 * below the keys' own rounding) against the keys sign-extended to int16, 32 products per
 * instruction, summed exactly in int32 (|sum| <= 32767 * 127 * 256 < 2^31); at head_dim 64
 * and 128 it runs on vpdpbusd over the keys as stored instead, 16 keys transposed at a time
 * (int8_tile_scores_t), with the same exact sums. p.V likewise
 * takes each row's weights (probability times value scale) as int16 against the values
 * sign-extended, two tokens per int32 lane as the bf16 kernel pairs them, and adds the int32
 * sums into float32 every FLUSH_PAIRS pairs. Converting V to float32 instead took three
 * times the instructions per token of the bf16 kernel's p.V, and decode is only partly
 * bound by memory on these CPUs: the int8 cache would have read half the bytes no faster.
 */
#ifndef GLINTHAWK_KVINT8_H
#define GLINTHAWK_KVINT8_H

/* The bf16 bits of the scale of a row whose largest magnitude is `amax` (1.0 for an
 * all-zero row). */
static inline uint16_t int8_scale(float amax) {
    if (!(amax > 0.0f)) return 0x3F80u;
    const float scale = amax / 127.0f;
    uint32_t bits;
    memcpy(&bits, &scale, sizeof bits);
    return (uint16_t)((bits + 0xFFFFu) >> 16);  /* round the magnitude up to a bf16 */
}

/* dim values of `src` (float32 or bfloat16) as int8 in dst, their scale's bits in *scale_out. */
static inline void quantize_row(const void *src, int dtype, int dim, int8_t *restrict dst, uint16_t *scale_out) {
    float amax = 0.0f;
    for (int d = 0; d < dim; d++) {
        const float x = fabsf(load(src, d, dtype));
        amax = x > amax ? x : amax;
    }
    const uint16_t bits = int8_scale(amax);
    const float scale = bf16_to_float(bits);
    for (int d = 0; d < dim; d++) {
        const float q = rintf(load(src, d, dtype) / scale);
        dst[d] = (int8_t)(q >= -127.0f ? (q <= 127.0f ? q : 127.0f) : -127.0f);  /* NaN: -127, not UB */
    }
    *scale_out = bits;
}

#ifdef HAVE_AVX512_PATH
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

static int int8_vnni_cpu_ok(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Rows t..t+15's bf16 scales as float32 (a bf16's bits, 16 places up), 0 where not `live`. */
AVX512VNNI static inline __m512 scale_lanes(const uint16_t *scales, int64_t t, __mmask16 live) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, scales + t));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

/* Lane j of the result = the sum of v[j]'s 16 int32 lanes (sum_each's tree, on integers). */
AVX512VNNI static inline __m512i sum_each_epi32(const __m512i v[TILE]) {
    __m512i pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                    _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                                    _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        halves[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The group's q rows as int16 (q16, row-major) with a float scale per row; dim a multiple of 16. */
AVX512VNNI static inline void q_as_int16(const float *restrict q, int group, int dim, int16_t *restrict q16,
                                         float *restrict q_scales) {
    for (int r = 0; r < group; r++) {
        const float *row = q + r * dim;
        __m512 lanes = _mm512_setzero_ps();
        for (int d = 0; d < dim; d += 16) lanes = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(row + d)), lanes);
        const float amax = _mm512_reduce_max_ps(lanes);
        const float scale = amax > 0.0f ? amax / 32767.0f : 1.0f;
        const __m512 divisor = _mm512_set1_ps(scale);
        for (int d = 0; d < dim; d += 16)  /* to nearest, ties to even, as rintf */
            _mm256_storeu_si256((__m256i *)(q16 + r * dim + d),
                                _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(row + d), divisor))));
        q_scales[r] = scale;
    }
}

/* Scores of the group's rows against keys t0..t0+n-1 (n <= TILE): `tile` holds those keys
 * sign-extended to int16. */
AVX512VNNI static inline __attribute__((always_inline)) void int8_tile_scores(
        const int16_t *restrict q16, const float *restrict q_scales, const int16_t *restrict tile,
        const uint16_t *key_scales, int64_t t0, int n, const int chunks, int group, float scale, float *scores,
        int64_t length) {
    const int dim = 32 * chunks;
    const __mmask16 live = (__mmask16)((1u << n) - 1);
    const __m512 token_scales = scale_lanes(key_scales, t0, live);
    for (int r = 0; r < group; r++) {
        __m512i qr[MAX_DIM / 32], dots[TILE];
        for (int c = 0; c < chunks; c++) qr[c] = _mm512_loadu_si512(q16 + r * dim + 32 * c);
        for (int j = 0; j < TILE; j++) {
            __m512i dot = _mm512_setzero_si512();
            if (j < n)
                for (int c = 0; c < chunks; c++) dot = _mm512_dpwssd_epi32(dot, qr[c], _mm512_loadu_si512(tile + j * dim + 32 * c));
            dots[j] = dot;
        }
        const __m512 sums = _mm512_cvtepi32_ps(sum_each_epi32(dots));
        _mm512_mask_storeu_ps(scores + r * length + t0, live,
                              _mm512_mul_ps(sums, _mm512_mul_ps(token_scales, _mm512_set1_ps(scale * q_scales[r]))));
    }
}

/* q.K from the int8 keys as stored, for head_dim 64 or 128 (`blocks` of 64 dims): no int16
 * copy of the keys and no reduction tree per key. q16 = 256 h + l (h its signed high byte, l
 * its unsigned low byte); vpdpbusd multiplies unsigned by signed bytes, so h.k is taken as
 * h.(k + 128) less 128 * sum(h), and l.k directly. |sum| < 2^31 for up to 128 dims: each
 * product of (k + 128) and h is at most 255 * 128. */
#define PLANES 8 /* vectors a row of q takes per 64-dim block: 4 of high bytes, then 4 of low */

/* The group's int16 q rows as planes[(r * blocks + b) * PLANES + e] (e < 4: high bytes, else
 * low): in 128-bit lane L, four times the dword of dims 4 (4L + e) .. 4 (4L + e) + 3 of block
 * b, what the transposed keys (int8_tile_scores_t) hold in lane L of their vector e.
 * high_sums[r]: the sum of row r's high bytes. */
AVX512VNNI static inline void q_planes(const int16_t *q16, int group, int blocks, void *planes, int32_t *high_sums) {
    const int dim = 64 * blocks;
    for (int r = 0; r < group; r++) {
        __m512i sum = _mm512_setzero_si512();
        for (int b = 0; b < blocks; b++) {
            const __m512i first = _mm512_loadu_si512(q16 + r * dim + 64 * b);
            const __m512i second = _mm512_loadu_si512(q16 + r * dim + 64 * b + 32);
            const __m512i high_words[2] = {_mm512_srai_epi16(first, 8), _mm512_srai_epi16(second, 8)};
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(_mm512_add_epi16(high_words[0], high_words[1]),
                                                          _mm512_set1_epi16(1)));
            const __m512i bytes[2] = {
                _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(high_words[0])),
                                   _mm512_cvtepi16_epi8(high_words[1]), 1),
                _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(first)), _mm512_cvtepi16_epi8(second),
                                   1)};
            char *out = (char *)planes + (size_t)(r * blocks + b) * PLANES * 64;
            for (int e = 0; e < 4; e++) {
                const __m512i pick = _mm512_add_epi32(_mm512_set1_epi32(e), _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4,
                                                                                                  8, 8, 8, 8, 12, 12, 12, 12));
                _mm512_storeu_si512(out + 64 * e, _mm512_permutexvar_epi32(pick, bytes[0]));
                _mm512_storeu_si512(out + 64 * (4 + e), _mm512_permutexvar_epi32(pick, bytes[1]));
            }
        }
        high_sums[r] = _mm512_reduce_add_epi32(sum);
    }
}

/* int8_tile_scores' contract from the int8 keys themselves: each 64-dim block of the 16 keys
 * is transposed in two steps, so that vector 4q + e holds, in lane L, dword 4L + e of keys
 * 4q..4q+3; the four lanes of a quad's sums are added at the end, once per 16 keys.
 * sums: 16 int32 a row of scratch. */
AVX512VNNI static inline __attribute__((always_inline)) void int8_tile_scores_t(
        const void *planes, const int32_t *high_sums, const float *q_scales, const int8_t *k,
        const uint16_t *key_scales, int64_t t0, int n, const int blocks, int group, float scale, float *scores,
        int64_t length, int32_t *sums) {
    const int dim = 64 * blocks;
    const __mmask16 live = (__mmask16)((1u << n) - 1);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < blocks; b++) {
        __m512i rows[TILE], pairs[TILE], u[TILE];
        for (int j = 0; j < TILE; j++)
            rows[j] = j < n ? _mm512_loadu_si512(k + (t0 + j) * dim + 64 * b) : _mm512_setzero_si512();
        for (int i = 0; i < TILE / 2; i++) {
            pairs[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
            pairs[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
        }
        for (int q = 0; q < 4; q++) {
            u[4 * q] = _mm512_unpacklo_epi64(pairs[4 * q], pairs[4 * q + 2]);
            u[4 * q + 1] = _mm512_unpackhi_epi64(pairs[4 * q], pairs[4 * q + 2]);
            u[4 * q + 2] = _mm512_unpacklo_epi64(pairs[4 * q + 1], pairs[4 * q + 3]);
            u[4 * q + 3] = _mm512_unpackhi_epi64(pairs[4 * q + 1], pairs[4 * q + 3]);
        }
        for (int r = 0; r < group; r++) {
            const char *plane = (const char *)planes + (size_t)(r * blocks + b) * PLANES * 64;
            __m512i quad[4];
            for (int q = 0; q < 4; q++) {
                __m512i acc = _mm512_setzero_si512();
                for (int e = 0; e < 4; e++)
                    acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(u[4 * q + e], flip),
                                              _mm512_loadu_si512(plane + 64 * e));
                acc = _mm512_slli_epi32(acc, 8);
                for (int e = 0; e < 4; e++)
                    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(plane + 64 * (4 + e)), u[4 * q + e]);
                quad[q] = acc;
            }
            /* lane M of the total: keys 4M..4M+3, quad M's four lanes added */
            const __m512i low = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[0], quad[1], 0x44),
                                                 _mm512_shuffle_i32x4(quad[0], quad[1], 0xEE));
            const __m512i high = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[2], quad[3], 0x44),
                                                  _mm512_shuffle_i32x4(quad[2], quad[3], 0xEE));
            const __m512i total = _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, 0x88),
                                                   _mm512_shuffle_i32x4(low, high, 0xDD));
            int32_t *sum = sums + 16 * r;
            _mm512_storeu_si512(sum, b == 0 ? total : _mm512_add_epi32(_mm512_loadu_si512(sum), total));
        }
    }
    const __m512 token_scales = scale_lanes(key_scales, t0, live);
    for (int r = 0; r < group; r++) {
        const __m512i exact =
            _mm512_sub_epi32(_mm512_loadu_si512(sums + 16 * r), _mm512_set1_epi32(high_sums[r] * 32768));
        _mm512_mask_storeu_ps(scores + r * length + t0, live,
                              _mm512_mul_ps(_mm512_cvtepi32_ps(exact),
                                            _mm512_mul_ps(token_scales, _mm512_set1_ps(scale * q_scales[r]))));
    }
}

/* Row r's weights (its softmax times each token's value scale, from the `scores`) as int16
 * in pairs (t, t+1) of `pairs`: weights[r * stride + j] holds tokens 2j (low) and 2j + 1
 * (high, 0 past length); w_scales[r] turns them back into floats and holds the softmax's
 * division, so each row takes three passes (maximum; e^x, its sum, value scale and the
 * weights' maximum; rounding). */
AVX512VNNI static inline void int16_weights(float *scores, int64_t length, int group, const uint16_t *value_scales,
                                            uint16_t *weights, int64_t stride, float *w_scales) {
    for (int r = 0; r < group; r++) {
        float *restrict s = scores + r * length;
        const __m512 highest = _mm512_set1_ps(max_of(s, length));
        __m512 total = _mm512_setzero_ps(), largest = _mm512_setzero_ps();
        for (int64_t t = 0; t < length; t += 16) {
            const __mmask16 live = lanes_before(t, length);
            const __m512 e = exp_lanes(s, t, length, highest);
            const __m512 weight = _mm512_mul_ps(e, scale_lanes(value_scales, t, live));
            total = _mm512_add_ps(total, e);
            largest = _mm512_max_ps(largest, weight);
            _mm512_mask_storeu_ps(s + t, live, weight);
        }
        const float top = _mm512_reduce_max_ps(largest);
        const float scale = top > 0.0f ? top / 32767.0f : 1.0f;
        const __m512 inverse = _mm512_set1_ps(1.0f / scale);
        uint16_t *row = weights + 2 * r * stride;
        for (int64_t t = 0; t < length; t += 16) {  /* rounded to nearest, as rintf: <= 32767 */
            const __mmask16 live = lanes_before(t, length);
            const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + t), inverse));
            _mm256_mask_storeu_epi16(row + t, live, _mm512_cvtepi32_epi16(rounded));
        }
        row[length] = 0;  /* an odd last token pairs with a zero weight */
        w_scales[r] = scale / _mm512_reduce_add_ps(total);
    }
}

/* The int32 sums of a row take at most this many token pairs (each adds at most
 * 2 * 32767 * 127 < 2^23.1) before they are added into float32. */
#define FLUSH_PAIRS 128

/* out rows r..r+rows-1 = their int16 weights (pairs, `stride` apart) times int8 V, like
 * accumulate_pairs: tokens in pairs, interleaved so that each int32 lane sums both. */
AVX512VNNI static inline __attribute__((always_inline)) void accumulate_int8_pairs(
        float *restrict out, const uint32_t *restrict weights, int64_t stride, const float *w_scales,
        const int8_t *v, int64_t length, int r, const int rows, const int chunks) {
    const int dim = 32 * chunks;
    const int64_t pairs = (length + 1) / 2;
    __m512 total[4][MAX_DIM / 16];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < 2 * chunks; c++) total[i][c] = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += FLUSH_PAIRS) {
        const int64_t end = pairs - p0 < FLUSH_PAIRS ? pairs : p0 + FLUSH_PAIRS;
        __m512i acc[4][MAX_DIM / 16];
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < 2 * chunks; c++) acc[i][c] = _mm512_setzero_si512();
        for (int64_t p = p0; p < end; p++) {
            const int64_t t = 2 * p;
            prefetch_rows(v, t + PREFETCH_TILES * TILE, 2, dim, length);
            __m512i weight[4];
            for (int i = 0; i < rows; i++) weight[i] = _mm512_set1_epi32((int)weights[(r + i) * stride + p]);
            for (int c = 0; c < chunks; c++) {
                const __m512i first = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + t * dim + 32 * c)));
                const __m512i second = t + 1 < length
                    ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + (t + 1) * dim + 32 * c)))
                    : _mm512_setzero_si512();
                const __m512i low = _mm512_unpacklo_epi16(first, second), high = _mm512_unpackhi_epi16(first, second);
                for (int i = 0; i < rows; i++) {
                    acc[i][2 * c] = _mm512_dpwssd_epi32(acc[i][2 * c], low, weight[i]);
                    acc[i][2 * c + 1] = _mm512_dpwssd_epi32(acc[i][2 * c + 1], high, weight[i]);
                }
            }
        }
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < 2 * chunks; c++)
                total[i][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][c]), _mm512_set1_ps(w_scales[r + i]), total[i][c]);
    }
    /* Per 128-bit lane L: the low accumulator holds dims 8L..8L+3, the high one 8L+4..8L+7.
     * accumulate_pairs' store, copied: one helper for both cost the bf16 kernel (PERFORMANCE.md). */
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < chunks; c++) {
            float *o = out + (r + i) * dim + 32 * c;
            _mm512_storeu_ps(o, _mm512_permutex2var_ps(total[i][2 * c], first_half, total[i][2 * c + 1]));
            _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(total[i][2 * c], second_half, total[i][2 * c + 1]));
        }
}

/* attend_head's contract for an int8 slab, dim = 32 * chunks. buffer (decode_items sizes
 * it): the group's int16 q rows, their scales and the weights' scales, then from the next
 * 64-byte boundary the K tile as int16 (TILE * dim; at head_dim 64 and 128 the transposed
 * q.K's sums and q planes instead), later the int16 weights (group * (length + 2)). */
AVX512VNNI static inline __attribute__((always_inline)) void attend_head_vnni(
        const float *restrict q, float *restrict out, const void *keys, const void *values,
        const uint16_t *key_scales, const uint16_t *value_scales, int64_t length, const int chunks, int group,
        float scale, float *restrict scores, float *restrict buffer) {
    const int dim = 32 * chunks;
    const int8_t *k = keys, *v = values;
    int16_t *q16 = (int16_t *)buffer;
    float *q_scales = buffer + group * dim / 2, *w_scales = q_scales + group;
    int16_t *tile = (int16_t *)(buffer + (group * dim / 2 + 2 * group + 15) / 16 * 16);
    q_as_int16(q, group, dim, q16, q_scales);
    const int transposed = chunks == 2 || chunks == 4;  /* head_dim 64 or 128: q.K on the keys as stored */
    int32_t *sums = (int32_t *)tile, *high_sums = sums + 16 * group;  /* decode_items sizes these */
    void *planes = high_sums + (group + 15) / 16 * 16;
    if (transposed) q_planes(q16, group, chunks / 2, planes, high_sums);
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        const int n = length - t0 < TILE ? (int)(length - t0) : TILE;
        prefetch_rows(k, t0 + PREFETCH_TILES * TILE, TILE, dim, length);
        if (transposed) {
            int8_tile_scores_t(planes, high_sums, q_scales, k, key_scales, t0, n, chunks / 2, group, scale, scores,
                               length, sums);
            continue;
        }
        for (int j = 0; j < n; j++)
            for (int c = 0; c < chunks; c++)
                _mm512_storeu_si512(tile + j * dim + 32 * c,
                                    _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(k + (t0 + j) * dim + 32 * c))));
        int8_tile_scores(q16, q_scales, tile, key_scales, t0, n, chunks, group, scale, scores, length);
    }
    const int64_t stride = (length + 2) / 2;  /* pairs per row of weights, with the zero pad */
    uint16_t *weights = (uint16_t *)tile;
    int16_weights(scores, length, group, value_scales, weights, stride, w_scales);
    const int most = chunks <= 2 ? 4 : 2;  /* query heads per pass over V: up to 16 accumulators */
    for (int r = 0; r < group;) {
        const int rows = group - r < most ? group - r : most;
        switch (rows) {
            case 4: accumulate_int8_pairs(out, (const uint32_t *)weights, stride, w_scales, v, length, r, 4, chunks); break;
            case 3: accumulate_int8_pairs(out, (const uint32_t *)weights, stride, w_scales, v, length, r, 3, chunks); break;
            case 2: accumulate_int8_pairs(out, (const uint32_t *)weights, stride, w_scales, v, length, r, 2, chunks); break;
            default: accumulate_int8_pairs(out, (const uint32_t *)weights, stride, w_scales, v, length, r, 1, chunks); break;
        }
        r += rows;
    }
}

#define VARIANT_VNNI(name, CHUNKS)                                                                            \
    AVX512VNNI static void name(const float *q, float *out, const void *keys, const void *values,             \
                                const uint16_t *key_scales, const uint16_t *value_scales, int64_t length,     \
                                int dim, int group, float scale, float *scores, float *buffer) {              \
        attend_head_vnni(q, out, keys, values, key_scales, value_scales, length, CHUNKS, group, scale, scores, \
                         buffer);                                                                             \
        (void)dim;                                                                                            \
    }
VARIANT_VNNI(vnni_head64, 2)
VARIANT_VNNI(vnni_head128, 4)
VARIANT_VNNI(vnni_head_any, dim / 32)
#endif

#endif
