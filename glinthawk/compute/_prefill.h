/* Causal prefill attention for _attention.c (its Python entry points included), kept apart
 * from decode: a different loop shape (compute-bound, no reduction across lanes). */
#ifndef GLINTHAWK_PREFILL_H
#define GLINTHAWK_PREFILL_H

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

#endif
