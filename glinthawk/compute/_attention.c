/* Fused decode attention over the KV store, for CPUs.
 *
 * One query token per sequence attends over that sequence's cached keys and values. Each
 * (sequence, KV head) pair's K and V are contiguous [length, head_dim] slabs, read once
 * each (q.K, softmax, then p.V), with the `group` query heads that share the KV head
 * served by the same read. Three implementations, picked per call (pick_kernel):
 *   - AVX512_BF16 (bf16 caches): vdpbf16ps on the cache as stored, no conversion;
 *   - AVX-512F: 16 scores at a time, summed by one transposing reduction tree;
 *   - portable C, compiled for x86-64-v4/v3/baseline and picked by the loader.
 * All accumulate in float32. The per-head kernels are in _decode_kernels.h, those for int8
 * caches in _kvint8.h, causal prefill in _prefill.h; this file picks and runs them.
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

#include "_decode_kernels.h"
#include "_kvint8.h"
#include "_prefill.h"

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
    /* scores, then a buffer for converted K/V rows, bf16 probabilities or int8 q planes, whichever is larger
     * (plus, for the int8 kernel, the group's int16 q rows, two scales per row and alignment:
     * see attend_head_vnni), then float32 copies of the group's q and out rows when q is not
     * float32 */
    const size_t group_floats = (size_t)group * a->dim;
    const size_t rows = (size_t)BLOCK * a->dim, weights = (size_t)group * (longest + 2);
    const size_t q_planes = (size_t)group * (17 + 2 * (size_t)a->dim) + 16;  /* the int8 kernel's transposed q.K */
    const size_t largest =
        rows > weights ? (rows > q_planes ? rows : q_planes) : (weights > q_planes ? weights : q_planes);
    const size_t buffer = largest + group_floats + 2 * (size_t)group + 16;
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
