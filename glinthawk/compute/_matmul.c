/* float32 linear layers at decode sizes, on CPUs with AVX-512F.
 *
 * At 64-128 rows with the weights cold in memory (a decode step streams every layer's
 * weights once), oneDNN's packed float32 matmul leaves much of the FMA peak unused; this
 * plain register-tiled loop, with the weights laid out once in 32-column panels and
 * prefetched ahead, is faster there and as fast at prefill sizes (figures in
 * docs/PERFORMANCE.md, "float32 matmuls on AVX-512F"). Each output element sums over k in
 * order, whatever the batch and its split: a row's result does not depend on its batch.
 *
 * Panels: a weight [n][k] (n a multiple of PANEL) as [n / PANEL][k][PANEL], so one step of k
 * reads two cache lines. Work items are (panel, block of rows) pairs, panel-major, split into
 * one slice per thread and run on torch's OpenMP workers (_openmp.h).
 * The callers check shapes and dtypes; this file trusts its arguments.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "_kernels.h"
#include "_openmp.h"

#define PANEL 32           /* output columns per panel: two 512-bit vectors */
#define PREFETCH_STEPS 64  /* how many steps of k ahead the panel is prefetched */

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#define AVX512 __attribute__((target("avx512f")))

/* out[r][0..31] = sum over k of a[r][k] * panel[k][0..31], for ROWS rows of a, lda apart. */
#define ROW_BLOCK(ROWS)                                                                                   \
    AVX512 static void rows##ROWS(const float *a, int64_t lda, const float *panel, int64_t depth, float *out, \
                                  int64_t ldo) {                                                          \
        __m512 low[ROWS], high[ROWS];                                                                     \
        for (int r = 0; r < ROWS; r++) low[r] = high[r] = _mm512_setzero_ps();                            \
        for (int64_t k = 0; k < depth; k++) {                                                             \
            const float *step = panel + k * PANEL;                                                        \
            _mm_prefetch((const char *)(step + PREFETCH_STEPS * PANEL), _MM_HINT_T0);                     \
            _mm_prefetch((const char *)(step + PREFETCH_STEPS * PANEL + 16), _MM_HINT_T0);                \
            const __m512 b0 = _mm512_loadu_ps(step), b1 = _mm512_loadu_ps(step + 16);                     \
            for (int r = 0; r < ROWS; r++) {                                                              \
                const __m512 x = _mm512_set1_ps(a[r * lda + k]);                                          \
                low[r] = _mm512_fmadd_ps(x, b0, low[r]);                                                  \
                high[r] = _mm512_fmadd_ps(x, b1, high[r]);                                                \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < ROWS; r++) {                                                                  \
            _mm512_storeu_ps(out + r * ldo, low[r]);                                                      \
            _mm512_storeu_ps(out + r * ldo + 16, high[r]);                                                \
        }                                                                                                 \
    }
/* 12 rows: 24 accumulators, two panel vectors and a broadcast fit the 32 registers. */
ROW_BLOCK(12)
ROW_BLOCK(8)
ROW_BLOCK(4)
ROW_BLOCK(2)
ROW_BLOCK(1)

/* Rows first..last-1 of x times one panel, into out's panel columns. */
AVX512 static void panel_rows(const float *x, const float *panel, float *out, int64_t first, int64_t last,
                              int64_t n, int64_t k) {
    for (int64_t row = first; row < last;) {
        const int64_t left = last - row;
        const float *a = x + row * k;
        float *o = out + row * n;
        if (left >= 12) rows12(a, k, panel, k, o, n), row += 12;
        else if (left >= 8) rows8(a, k, panel, k, o, n), row += 8;
        else if (left >= 4) rows4(a, k, panel, k, o, n), row += 4;
        else if (left >= 2) rows2(a, k, panel, k, o, n), row += 2;
        else rows1(a, k, panel, k, o, n), row += 1;
    }
}

static int cpu_ok(void) { return __builtin_cpu_supports("avx512f"); }
#else
static int cpu_ok(void) { return 0; }
#endif

typedef struct {
    const float *x, *panels;
    float *out;
    int64_t m, n, k, blocks, block_rows;  /* row blocks per panel, rows per block */
} linear_args;

static int linear_items(const void *data, int64_t first, int64_t last) {
#ifdef HAVE_AVX512_PATH
    const linear_args *a = data;
    for (int64_t item = first; item < last; item++) {
        const int64_t panel = item / a->blocks, block = item % a->blocks;
        const int64_t row = block * a->block_rows;
        const int64_t end = row + a->block_rows < a->m ? row + a->block_rows : a->m;
        panel_rows(a->x, a->panels + panel * a->k * PANEL, a->out + panel * PANEL, row, end, a->n, a->k);
    }
#else
    (void)data, (void)first, (void)last;
#endif
    return 0;
}

/* pack_panels(weight, out, n, k): weight [n][k] into out as [n / PANEL][k][PANEL]. */
static PyObject *pack_panels(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long weight_addr, out_addr;
    Py_ssize_t n, k;
    if (!PyArg_ParseTuple(args, "KKnn", &weight_addr, &out_addr, &n, &k)) return NULL;
    if (n <= 0 || k <= 0 || n % PANEL != 0) {
        PyErr_SetString(PyExc_ValueError, "pack_panels: n must be a positive multiple of PANEL and k positive");
        return NULL;
    }
    const float *weight = (const float *)(uintptr_t)weight_addr;
    float *out = (float *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t p = 0; p < n / PANEL; p++)
        for (int64_t step = 0; step < k; step++)
            for (int64_t j = 0; j < PANEL; j++) out[(p * k + step) * PANEL + j] = weight[(p * PANEL + j) * k + step];
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* linear(x, panels, out, m, n, k, threads): out [m][n] = x [m][k] times the packed weight's
 * transpose, over up to `threads` of torch's workers. */
static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_addr, panels_addr, out_addr;
    Py_ssize_t m, n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x_addr, &panels_addr, &out_addr, &m, &n, &k, &threads)) return NULL;
    if (m <= 0 || k <= 0 || n <= 0 || n % PANEL != 0 || threads <= 0 || !cpu_ok()) {
        PyErr_SetString(PyExc_ValueError, "linear: bad geometry or thread count, or a CPU without AVX-512F");
        return NULL;
    }
    /* Enough row blocks that every thread gets work when panels are few; at least 12 rows each. */
    const int64_t panels = n / PANEL, most_blocks = (m + 11) / 12;
    int64_t blocks = (4 * (int64_t)threads + panels - 1) / panels;
    blocks = blocks < 1 ? 1 : blocks > most_blocks ? most_blocks : blocks;
    const int64_t block_rows = (m + blocks - 1) / blocks;
    blocks = (m + block_rows - 1) / block_rows;
    const linear_args a = {(const float *)(uintptr_t)x_addr, (const float *)(uintptr_t)panels_addr,
                           (float *)(uintptr_t)out_addr, m, n, k, blocks, block_rows};
    const int64_t items = panels * blocks;
    const int count = items < threads ? (int)items : threads;
    int64_t slices[2 * 64];
    const int used = count < 64 ? count : 64;
    for (int s = 0; s < used; s++) slices[2 * s] = items * s / used, slices[2 * s + 1] = items * (s + 1) / used;
    Py_BEGIN_ALLOW_THREADS
    run_slices(linear_items, &a, slices, used);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *supported(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(cpu_ok());
}

static PyMethodDef methods[] = {
    {"pack_panels", pack_panels, METH_VARARGS, "Lay out a float32 weight [n][k] in panels of PANEL columns."},
    {"linear", linear, METH_VARARGS, "x times a panel-packed weight's transpose, on torch's OpenMP workers."},
    {"use_openmp", use_openmp, METH_VARARGS, "Run slices as parallel regions of this OpenMP runtime."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs linear (AVX-512F)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matmul", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__matmul(void) {
    static const int_constant constants[] = {{"PANEL", PANEL}, {NULL, 0}};
    return create_module(&module, constants);
}
