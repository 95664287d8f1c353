/* RMSNorm, rotary embedding, argmax and token masks on the CPU, on the calling thread.
 *
 * Tier 1 runs each layer's small elementwise ops between network round trips, from a
 * compute thread. There torch's OpenMP team has gone to sleep by the time each op starts,
 * and waking it costs more than the op (an RMSNorm of 64 x 768 in bf16: 125-200 us in
 * torch there, 9 us here). These loops do the same arithmetic, with the same roundings as
 * the torch expressions in layers.py and rope.py, on one thread with the GIL released,
 * compiled for the CPU's widest vector unit; they beat torch's two threads at prefill
 * sizes too, where torch's expressions make temporaries of the whole batch.
 *
 * The callers check dtypes, shapes and contiguity; this file trusts its arguments.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_kernels.h"

/* What one torch op in `dtype` leaves of a float32 result: itself, or its bf16 rounding. */
static inline float rounded(float value, int dtype) {
    if (dtype == FLOAT32) return value;
    return bf16_to_float(float_to_bf16(value));
}

/* The loops, inlined with `dtype` a constant so that each variant vectorises. */
static inline __attribute__((always_inline)) void rms_norm_rows(const void *x, const void *weight, void *out,
                                                                int64_t rows, int64_t dim, float eps, const int dtype) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t first = r * dim;
        float total = 0.0f;
        for (int64_t d = 0; d < dim; d++) {
            const float v = load(x, first + d, dtype);
            total += v * v;
        }
        const float scale = 1.0f / sqrtf(total / (float)dim + eps);
        for (int64_t d = 0; d < dim; d++)
            store(out, first + d, load(weight, d, dtype) * rounded(load(x, first + d, dtype) * scale, dtype), dtype);
    }
}

static inline __attribute__((always_inline)) void rotary_rows(const void *x, const void *cos_table,
                                                              const void *sin_table, void *out, int64_t tokens,
                                                              int64_t heads, int64_t dim, int64_t token_stride,
                                                              const int dtype) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t row = t * token_stride + h * dim, out_row = (t * heads + h) * dim, table = t * dim;
            for (int64_t d = 0; d < half; d++) {  /* rotate_half: -x[d + half] here, x[d - half] below */
                const float direct = rounded(load(x, row + d, dtype) * load(cos_table, table + d, dtype), dtype);
                const float turned = rounded(-load(x, row + d + half, dtype) * load(sin_table, table + d, dtype), dtype);
                store(out, out_row + d, direct + turned, dtype);
            }
            for (int64_t d = half; d < dim; d++) {
                const float direct = rounded(load(x, row + d, dtype) * load(cos_table, table + d, dtype), dtype);
                const float turned = rounded(load(x, row + d - half, dtype) * load(sin_table, table + d, dtype), dtype);
                store(out, out_row + d, direct + turned, dtype);
            }
        }
}

/* One compiled variant per dtype and instruction set (the loader picks the widest the CPU
 * has): AVX-512 runs these loops 2-3x faster than the baseline build. */
MULTIVERSION static void rms_norm_f32(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                                      float eps) {
    rms_norm_rows(x, weight, out, rows, dim, eps, FLOAT32);
}

MULTIVERSION static void rms_norm_bf16(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                                       float eps) {
    rms_norm_rows(x, weight, out, rows, dim, eps, BFLOAT16);
}

MULTIVERSION static void rotary_f32(const void *x, const void *cos_table, const void *sin_table, void *out,
                                    int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride) {
    rotary_rows(x, cos_table, sin_table, out, tokens, heads, dim, token_stride, FLOAT32);
}

MULTIVERSION static void rotary_bf16(const void *x, const void *cos_table, const void *sin_table, void *out,
                                     int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride) {
    rotary_rows(x, cos_table, sin_table, out, tokens, heads, dim, token_stride, BFLOAT16);
}

/* rms_norm(x, weight, out, rows, dim, eps, dtype):
 * out = weight * (x * rsqrt(mean(x^2) + eps)), the statistics in float32 and the
 * normalised row rounded to dtype before the weight, as layers.rms_norm does. */
static PyObject *rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_addr, weight_addr, out_addr;
    Py_ssize_t rows, dim;
    float eps;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKnnfi", &x_addr, &weight_addr, &out_addr, &rows, &dim, &eps, &dtype)) return NULL;
    const void *x = (const void *)(uintptr_t)x_addr, *weight = (const void *)(uintptr_t)weight_addr;
    void *out = (void *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == FLOAT32)
        rms_norm_f32(x, weight, out, rows, dim, eps);
    else
        rms_norm_bf16(x, weight, out, rows, dim, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rotary(x, cos, sin, out, tokens, heads, dim, token_stride, dtype): x [tokens, heads,
 * dim] with tokens token_stride elements apart (q and k are column slices of the fused
 * QKV output), out [tokens, heads, dim] contiguous; cos, sin [tokens, dim].
 * out = x * cos + rotate_half(x) * sin, each product and the sum rounded to dtype as the
 * three torch ops in rope.apply_rotary leave them. */
static PyObject *rotary(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_addr, cos_addr, sin_addr, out_addr;
    Py_ssize_t tokens, heads, dim, token_stride;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKKnnnni", &x_addr, &cos_addr, &sin_addr, &out_addr, &tokens, &heads, &dim,
                          &token_stride, &dtype))
        return NULL;
    const void *x = (const void *)(uintptr_t)x_addr, *cos_table = (const void *)(uintptr_t)cos_addr;
    const void *sin_table = (const void *)(uintptr_t)sin_addr;
    void *out = (void *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == FLOAT32)
        rotary_f32(x, cos_table, sin_table, out, tokens, heads, dim, token_stride);
    else
        rotary_bf16(x, cos_table, sin_table, out, tokens, heads, dim, token_stride);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

MULTIVERSION static void argmax_rows(const void *x, int64_t *out, int64_t rows, int64_t cols, int dtype) {
    const int64_t row_bytes = cols * (dtype == FLOAT32 ? 4 : 2);
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)x + r * row_bytes;
        out[r] = dtype == FLOAT32 ? first_maximum(row, cols, FLOAT32) : first_maximum(row, cols, BFLOAT16);
    }
}

/* argmax(x, out, rows, cols, dtype): out[r] (int64) = the index of the first maximum of
 * row r of x, or of its first NaN if it has one, as torch.argmax. torch's reduction reads
 * about 2 GB/s here; two passes (the maximum vectorises) run at memory speed. */
static PyObject *argmax(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_addr, out_addr;
    Py_ssize_t rows, cols;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKnni", &x_addr, &out_addr, &rows, &cols, &dtype)) return NULL;
    const void *x = (const void *)(uintptr_t)x_addr;
    int64_t *out = (int64_t *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    argmax_rows(x, out, rows, cols, dtype);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* A row's logits outside its bitmask to -inf, a 32-bit word at a time: a grammar's mask is
 * mostly whole words of 0 (or of 1), and the rest is a select, not a branch per token. */
#define MASK_ROW(NAME, T, NEG_INF)                                                                 \
    static void NAME(T *restrict row, const uint32_t *restrict mask, int64_t covered, int64_t cols) { \
        const int64_t full = covered / 32;                                                          \
        for (int64_t w = 0; w < full; w++) {                                                        \
            const uint32_t bits = mask[w];                                                          \
            T *restrict at = row + w * 32;                                                          \
            if (bits == 0xFFFFFFFFu) continue;                                                      \
            if (bits == 0) {                                                                        \
                for (int b = 0; b < 32; b++) at[b] = (NEG_INF);                                     \
                continue;                                                                           \
            }                                                                                       \
            for (int b = 0; b < 32; b++) at[b] = ((bits >> b) & 1u) ? at[b] : (NEG_INF);           \
        }                                                                                           \
        for (int64_t c = full * 32; c < covered; c++)                                               \
            if (!((mask[c >> 5] >> (c & 31)) & 1u)) row[c] = (NEG_INF);                            \
        for (int64_t c = covered; c < cols; c++) row[c] = (NEG_INF);                                \
    }
MASK_ROW(mask_row_f32, float, -INFINITY)
MASK_ROW(mask_row_bf16, uint16_t, (uint16_t)0xFF80) /* bfloat16 -inf */

/* mask_logits(x, rows, n, cols, masks, words, dtype): for each i < n, sets to -inf the
 * entries of row rows[i] of x whose bit in masks[i] (`words` int32 words, bit b of word w
 * for column 32 w + b) is 0, and those past the mask. Structured output's token masks: a
 * pass over a row's bits, where torch's masked_fill of a bf16 batch took 5 ms for 128 x 4096. */
static PyObject *mask_logits(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_addr, rows_addr, masks_addr;
    Py_ssize_t n, cols, words;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKnnKni", &x_addr, &rows_addr, &n, &cols, &masks_addr, &words, &dtype)) return NULL;
    const int64_t *rows = (const int64_t *)(uintptr_t)rows_addr;
    const uint32_t *masks = (const uint32_t *)(uintptr_t)masks_addr;
    const int64_t covered = words * 32 < cols ? words * 32 : cols;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++) {
        if (dtype == FLOAT32)
            mask_row_f32((float *)(uintptr_t)x_addr + rows[i] * cols, masks + i * words, covered, cols);
        else
            mask_row_bf16((uint16_t *)(uintptr_t)x_addr + rows[i] * cols, masks + i * words, covered, cols);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rms_norm", rms_norm, METH_VARARGS, "RMSNorm over rows, on this thread."},
    {"rotary", rotary, METH_VARARGS, "Rotary embedding (half-split layout), on this thread."},
    {"argmax", argmax, METH_VARARGS, "Index of each float32 or bfloat16 row's first maximum, on this thread."},
    {"mask_logits", mask_logits, METH_VARARGS, "Disallowed tokens' logits to -inf, by bitmask, on this thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_elementwise", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__elementwise(void) { return create_module(&module, NULL); }
