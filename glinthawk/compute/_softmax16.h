/* The softmax of the AVX-512 decode kernels (_decode_kernels.h, _kvint8.h), 16 lanes at a
 * time; included inside _decode_kernels.h's AVX-512 section, where AVX512 is defined. */
#ifndef GLINTHAWK_SOFTMAX16_H
#define GLINTHAWK_SOFTMAX16_H

/* Lanes t..t+15 of a row of `length`: all, or those before its end. */
AVX512 static inline __mmask16 lanes_before(int64_t t, int64_t length) {
    return length - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (length - t)) - 1);
}

/* The largest of s[0..length-1]. The plain loop does not vectorise: without
 * -ffinite-math-only a float maximum is no reduction GCC may reorder. */
AVX512 static inline float max_of(const float *s, int64_t length) {
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    __m512 lanes = lowest;
    for (int64_t t = 0; t < length; t += 16)
        lanes = _mm512_max_ps(_mm512_mask_loadu_ps(lowest, lanes_before(t, length), s + t), lanes);
    return _mm512_reduce_max_ps(lanes);
}

/* exp_nonpositive on 16 lanes, in fused multiply-adds (-std=c11 lets GCC contract none of
 * the scalar form's). Same polynomial, with the two-part ln 2 kept apart (the scalar form's
 * reassociation merges it). */
AVX512 static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.0f);
    const __mmask16 live = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);  /* not NaN, not below -87 */
    const __m512 clamped = _mm512_max_ps(x, lowest);
    const __m512i n = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_cvttps_epi32(_mm512_fnmadd_ps(
        clamped, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f))));
    const __m512 nf = _mm512_cvtepi32_ps(n);
    const __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), clamped));
    __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
    poly = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps(live, poly, two_n);
}

/* e^(s[t] - highest) of lanes t..t+15, 0 in those at or past `length`. */
AVX512 static inline __m512 exp_lanes(const float *s, int64_t t, int64_t length, __m512 highest) {
    const __mmask16 live = lanes_before(t, length);
    return _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), highest)));
}

/* e^(s[t] - the row's largest) of t < length into s, and their sum. */
AVX512 static inline float exp_row(float *restrict s, int64_t length) {
    const __m512 highest = _mm512_set1_ps(max_of(s, length));
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 16) {
        const __m512 e = exp_lanes(s, t, length, highest);
        total = _mm512_add_ps(total, e);
        _mm512_mask_storeu_ps(s + t, lanes_before(t, length), e);
    }
    return _mm512_reduce_add_ps(total);
}

/* softmax_rows' contract, 16 lanes at a time. */
AVX512 static inline void softmax_rows16(float *restrict scores, int64_t length, int group) {
    for (int r = 0; r < group; r++) {
        float *restrict s = scores + r * length;
        const __m512 inverse = _mm512_set1_ps(1.0f / exp_row(s, length));
        for (int64_t t = 0; t < length; t += 16) {
            const __mmask16 live = lanes_before(t, length);
            _mm512_mask_storeu_ps(s + t, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + t), inverse));
        }
    }
}

#endif
