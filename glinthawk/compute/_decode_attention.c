/* Fused decode attention over the KV store, for CPUs.
 *
 * One query token per sequence attends over that sequence's cached keys and values. The
 * work is memory-bound: every cached K and V row is read once, so the kernel streams each
 * (sequence, KV head) pair's contiguous [length, head_dim] slabs twice over (q.K, then
 * p.V) with the `group` query heads that share the KV head served by the same read.
 *
 * The caller (glinthawk/compute/attention.py) checks every shape, dtype and range; this
 * file trusts its arguments. It splits the work items over its own thread pool and calls
 * `decode_attention` once per slice with the GIL released, so no OpenMP runtime is needed
 * beside torch's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* One build runs everywhere; the loader picks the widest vector unit the CPU has. */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

enum { KV_FLOAT32 = 0, KV_BFLOAT16 = 1 };

static inline float bf16_to_float(uint16_t bits) {
    uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

/* Tokens handled per step of each pass: a block of K or V rows (as float32, at most
 * 32 x 256 floats) stays in L1 while every query head of the group uses it. */
#define BLOCK 32

/* Rows t0..t0+n-1 of a [length, dim] slab as float32: the slab itself, or `buffer` filled
 * from bfloat16. */
static inline const float *rows_as_float(const void *slab, int64_t t0, int64_t n, int dim, int kv_dtype,
                                         float *restrict buffer) {
    if (kv_dtype == KV_FLOAT32) return (const float *)slab + t0 * dim;
    const uint16_t *restrict source = (const uint16_t *)slab + t0 * dim;
    for (int64_t i = 0; i < n * dim; i++) buffer[i] = bf16_to_float(source[i]);
    return buffer;
}

/* e^x for x <= 0 (scores minus their maximum), to about 2 ulp: a polynomial after range
 * reduction, so the softmax loop vectorises without libm (and without -ffast-math, which
 * would switch the whole process to flush-to-zero). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float power;
    memcpy(&power, &bits, sizeof power);
    return p * power;
}

/* out[group][dim] = softmax(q[group][dim] . K^T * scale) . V for one KV head of one sequence.
 * scores: scratch of group * length floats; buffer: scratch of BLOCK * dim floats.
 * Always inlined into the variants below, where dim and kv_dtype are constants. */
static inline __attribute__((always_inline)) void attend_head(
        const float *restrict q, float *restrict out, const void *keys, const void *values, int64_t length,
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
    for (int r = 0; r < group; r++) {
        float *restrict s = scores + r * length;
        float highest = s[0];
        for (int64_t t = 1; t < length; t++) highest = s[t] > highest ? s[t] : highest;
        float total = 0.0f;
        for (int64_t t = 0; t < length; t++) {
            s[t] = exp_nonpositive(s[t] - highest);
            total += s[t];
        }
        const float inverse = 1.0f / total;
        for (int64_t t = 0; t < length; t++) s[t] *= inverse;
    }
    for (int64_t i = 0; i < (int64_t)group * dim; i++) out[i] = 0.0f;
    for (int64_t t0 = 0; t0 < length; t0 += BLOCK) {
        const int64_t n = length - t0 < BLOCK ? length - t0 : BLOCK;
        const float *restrict v = rows_as_float(values, t0, n, dim, kv_dtype, buffer);
        for (int r = 0; r < group; r++) {
            const float *restrict p = scores + r * length + t0;
            float *restrict o = out + (int64_t)r * dim;
            for (int64_t t = 0; t < n; t++)
                for (int d = 0; d < dim; d++) o[d] += p[t] * v[t * dim + d];
        }
    }
}

typedef void (*head_kernel)(const float *, float *, const void *, const void *, int64_t, int, int, float, float *,
                            float *);

/* One variant per (head_dim, KV dtype): constant sizes let the compiler unroll and keep
 * the accumulators in registers; other head sizes take the generic variant. */
#define VARIANT(name, DIM, DTYPE)                                                                            \
    MULTIVERSION static void name(const float *q, float *out, const void *keys, const void *values,           \
                                  int64_t length, int dim, int group, float scale, float *scores,             \
                                  float *buffer) {                                                            \
        (void)dim;                                                                                            \
        attend_head(q, out, keys, values, length, DIM, group, DTYPE, scale, scores, buffer);                  \
    }
VARIANT(head64_f32, 64, KV_FLOAT32)
VARIANT(head64_bf16, 64, KV_BFLOAT16)
VARIANT(head128_f32, 128, KV_FLOAT32)
VARIANT(head128_bf16, 128, KV_BFLOAT16)
VARIANT(head_any_f32, dim, KV_FLOAT32)
VARIANT(head_any_bf16, dim, KV_BFLOAT16)

static head_kernel pick_kernel(int dim, int kv_dtype) {
    const int bf16 = kv_dtype == KV_BFLOAT16;
    if (dim == 64) return bf16 ? head64_bf16 : head64_f32;
    if (dim == 128) return bf16 ? head128_bf16 : head128_f32;
    return bf16 ? head_any_bf16 : head_any_f32;
}

/* decode_attention(q, out, keys, values, bases, lengths, first_item, last_item,
 *                  heads, kv_heads, head_dim, head_stride, kv_dtype, scale)
 *
 * q, out: float32 [sequences, heads, head_dim], addresses as ints.
 * keys, values: one layer of the store, [kv_heads, capacity, head_dim] with KV heads
 *   head_stride elements apart, float32 or bfloat16 (kv_dtype).
 * bases, lengths: int64 per sequence: its first buffer row and its cached length (>= 1).
 * Work items first_item..last_item-1 are (sequence, KV head) pairs, item = seq * kv_heads + g.
 */
static PyObject *decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q_addr, out_addr, keys_addr, values_addr, bases_addr, lengths_addr;
    Py_ssize_t first_item, last_item, head_stride;
    int heads, kv_heads, dim, kv_dtype;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKnniiinif", &q_addr, &out_addr, &keys_addr, &values_addr, &bases_addr,
                          &lengths_addr, &first_item, &last_item, &heads, &kv_heads, &dim, &head_stride,
                          &kv_dtype, &scale))
        return NULL;
    if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || (kv_dtype != KV_FLOAT32 && kv_dtype != KV_BFLOAT16)) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad geometry or KV dtype");
        return NULL;
    }
    const float *q = (const float *)(uintptr_t)q_addr;
    float *out = (float *)(uintptr_t)out_addr;
    const int64_t *bases = (const int64_t *)(uintptr_t)bases_addr;
    const int64_t *lengths = (const int64_t *)(uintptr_t)lengths_addr;
    const int group = heads / kv_heads;
    const size_t element = kv_dtype == KV_FLOAT32 ? 4 : 2;
    int64_t longest = 1;
    for (Py_ssize_t item = first_item; item < last_item; item++)
        if (lengths[item / kv_heads] > longest) longest = lengths[item / kv_heads];
    const head_kernel kernel = pick_kernel(dim, kv_dtype);
    float *scratch = malloc(sizeof(float) * ((size_t)group * (size_t)longest + (size_t)BLOCK * (size_t)dim));
    if (scratch == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t item = first_item; item < last_item; item++) {
        const int64_t seq = item / kv_heads, g = item % kv_heads;
        const size_t offset = ((size_t)g * (size_t)head_stride + (size_t)bases[seq] * (size_t)dim) * element;
        const int64_t first_head = seq * heads + g * group;
        kernel(q + first_head * dim, out + first_head * dim, (const char *)(uintptr_t)keys_addr + offset,
               (const char *)(uintptr_t)values_addr + offset, lengths[seq], dim, group, scale,
               scratch + (size_t)BLOCK * dim, scratch);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS, "Fused decode attention over a slice of work items."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode_attention", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__decode_attention(void) { return PyModule_Create(&module); }
