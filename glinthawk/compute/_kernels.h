/* Shared by the C kernels: the element types they take (each module exports their codes,
 * which elementwise.C_DTYPE_CODES reads), conversions that round as torch does,
 * multiversioning, two pieces of a softmax: e^x for x <= 0 (attention, the sampler) and
 * the index of a row's first maximum (argmax, the sampler), and the modules' creation. */
#ifndef GLINTHAWK_KERNELS_H
#define GLINTHAWK_KERNELS_H

#include <Python.h> /* after the module's own #define PY_SSIZE_T_CLEAN */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* One build runs everywhere; the loader picks the widest vector unit the CPU has. */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

enum { FLOAT32 = 0, BFLOAT16 = 1, INT8 = 2 };  /* INT8: KV caches only, with bf16 scales */

static inline float bf16_to_float(uint16_t bits) {
    const uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

/* float32 -> bfloat16 bits, rounding to nearest even (as torch does; inputs are finite). */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline float load(const void *base, int64_t i, int dtype) {
    return dtype == FLOAT32 ? ((const float *)base)[i] : bf16_to_float(((const uint16_t *)base)[i]);
}

static inline void store(void *base, int64_t i, float value, int dtype) {
    if (dtype == FLOAT32)
        ((float *)base)[i] = value;
    else
        ((uint16_t *)base)[i] = float_to_bf16(value);
}

/* e^x for x <= 0 (a softmax's scores minus their maximum), vectorisable without libm (and
 * without -ffast-math, which would switch the whole process to flush-to-zero): 2^n * p(r),
 * n = round(x / ln 2) (truncating a positive value), r = x - n ln 2, p a degree-7
 * polynomial (Cephes). Relative error about 1e-7 down to x = -15; the build's reassociation
 * merges the two-part ln 2, which grows it to about 4e-6 at -87, on values under 3e-7 of
 * e^0. Below -87 (e^-87 is near float32's smallest normal), and for NaN, 0: a token or
 * key whose score is -inf weighs nothing. */
static inline float exp_nonpositive(float x) {
    const float clamped = x >= -87.0f ? x : -87.0f;
    const int32_t n = -(int32_t)(0.5f - clamped * 1.44269504088896341f);
    const float r = (clamped - (float)n * 0.693359375f) + (float)n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const union { uint32_t bits; float value; } scale = {.bits = (uint32_t)(n + 127) << 23};
    return x >= -87.0f ? p * scale.value : 0.0f;
}

/* Index of the first maximum of row[0..cols-1] (float32 or bfloat16), or of its first
 * NaN. One pass keeps LANES running maxima and their first indices in vectors (GCC/Clang
 * vector extensions: a few vector ops per step on the widest unit the CPU has); bf16
 * widens to float32 exactly, so both dtypes pick what torch.argmax picks. */
#define LANES 16
typedef float float_lanes __attribute__((vector_size(4 * LANES)));
typedef int32_t int_lanes __attribute__((vector_size(4 * LANES)));
typedef uint16_t half_lanes __attribute__((vector_size(2 * LANES)));

static inline __attribute__((always_inline)) float_lanes load_lanes(const void *row, int64_t c, const int dtype) {
    float_lanes x;
    if (dtype == FLOAT32) {
        memcpy(&x, (const float *)row + c, sizeof x);
    } else {
        half_lanes bits;
        memcpy(&bits, (const uint16_t *)row + c, sizeof bits);
        x = (float_lanes)(__builtin_convertvector(bits, int_lanes) << 16);
    }
    return x;
}

static inline __attribute__((always_inline)) int64_t first_maximum(const void *row, int64_t cols, const int dtype) {
    float_lanes highest;
    int_lanes where = {0}, position, nan = {0};
    for (int j = 0; j < LANES; j++) highest[j] = -INFINITY, position[j] = j;
    int64_t c = 0;
    for (; c + LANES <= cols && cols <= INT32_MAX; c += LANES, position += LANES) {
        const float_lanes x = load_lanes(row, c, dtype);
        const int_lanes greater = x > highest;  /* strictly: each lane keeps its first maximum */
        highest = (float_lanes)(((int_lanes)x & greater) | ((int_lanes)highest & ~greater));
        where = (position & greater) | (where & ~greater);
        nan |= x != x;
    }
    float best = -INFINITY;
    int64_t index = 0;
    int any_nan = 0;
    for (int j = 0; j < LANES; j++) {
        if (highest[j] > best || (highest[j] == best && where[j] < index)) best = highest[j], index = where[j];
        any_nan |= nan[j];
    }
    for (; c < cols; c++) {
        const float x = load(row, c, dtype);
        if (x > best) best = x, index = c;
        any_nan |= x != x;
    }
    if (any_nan)
        for (c = 0; c < cols; c++)
            if (load(row, c, dtype) != load(row, c, dtype)) return c;
    return index;
}

/* The module `definition` describes, exporting the dtype codes and `constants` (ending in a NULL
 * name): the Python side reads them rather than keeping copies that could drift. */
typedef struct {
    const char *name;
    long value;
} int_constant;

static int add_constants(PyObject *m, const int_constant *constants) {
    for (const int_constant *c = constants; c != NULL && c->name != NULL; c++)
        if (PyModule_AddIntConstant(m, c->name, c->value) < 0) return -1;
    return 0;
}

static PyObject *create_module(PyModuleDef *definition, const int_constant *constants) {
    static const int_constant dtypes[] = {{"FLOAT32", FLOAT32}, {"BFLOAT16", BFLOAT16}, {"INT8", INT8}, {NULL, 0}};
    PyObject *m = PyModule_Create(definition);
    if (m != NULL && (add_constants(m, dtypes) < 0 || add_constants(m, constants) < 0)) Py_CLEAR(m);
    return m;
}

#endif
