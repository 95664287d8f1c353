/* Random (non-greedy) token sampling on the CPU, a slice of rows per thread of torch's.
 *
 * The torch expressions in sampling.py make several whole-batch temporaries (float32
 * copy, scaled logits, softmax, masks), and top-p sorts the whole vocabulary: at 128 rows
 * of 32,000 bf16 logits on 2 AMD EPYC cores, 2.6 ms with temperature alone, 110 ms with
 * top-p and 7.8 ms with top-k 50 (best of 7), against a 38 ms decode step. Here a row's
 * weights go to one scratch row, the filters find their thresholds by selection
 * (threshold_of), not by sorting, and the rows are split over torch's threads (still
 * spinning after the LM head's matmul): 1.0, 1.5-3.5 (a nucleus of tens or of hundreds of
 * tokens) and 1.4 ms.
 *
 *   x = logit / temperature                          (float32)
 *   w = exp(x - max x)                               (softmax, left unnormalised)
 *   top-k:  w below the k-th largest w drops out     (ties with it stay)
 *   min-p:  w below min_p (times the largest w, 1) drops out
 *   top-p:  the most likely tokens whose weight first reaches top_p of the total stay,
 *           with every token that ties the least likely of them
 *   token = the first whose cumulative weight, in vocabulary order, exceeds draw * total
 *
 * The callers check dtypes, shapes and contiguity; this file trusts its arguments.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"
#include "_openmp.h"

/* Weights in [0, 1] by their leading bits (exponent and 3 mantissa bits), in the order of
 * their values: a histogram narrows a filter's threshold to one bucket in one pass. */
enum { BUCKETS = (0x3F800000 >> 20) + 1 };

static inline int32_t bucket_of(float weight) {
    const union { float value; uint32_t bits; } w = {.value = weight};
    return (int32_t)(w.bits >> 20);
}

/* Partitions values[0..n) in place, around pivot: those above it first, then those equal,
 * then those below. Sets the counts of the first two groups and the sum of the first. */
static void partition(float *values, int64_t n, float pivot, int64_t *above, int64_t *equal, double *above_sum) {
    int64_t high = 0, middle = 0, low = n; /* [0, high) > pivot, [high, middle) == pivot, [low, n) < pivot */
    double sum = 0.0;
    while (middle < low) {
        const float v = values[middle];
        if (v > pivot) {
            values[middle] = values[high];
            values[high++] = v;
            middle++;
            sum += v;
        } else if (v == pivot) {
            middle++;
        } else {
            values[middle] = values[--low];
            values[low] = v;
        }
    }
    *above = high;
    *equal = middle - high;
    *above_sum = sum;
}

static float median_of_three(const float *values, int64_t n) {
    const float a = values[0], b = values[n / 2], c = values[n - 1];
    if (a < b) return b < c ? b : (a < c ? c : a);
    return a < c ? a : (b < c ? c : b);
}

static int descending(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* select_largest's answer by sorting values[0..n): O(n log n) whatever their order. */
static float select_by_sorting(float *values, int64_t n, double rank, int by_mass, float least) {
    qsort(values, (size_t)n, sizeof *values, descending);
    double reached = 0.0;
    for (int64_t i = 0; i < n;) {
        int64_t end = i;
        for (; end < n && values[end] == values[i]; end++) reached += by_mass ? (double)values[end] : 1.0;
        if (reached >= rank) return values[i];
        i = end;
    }
    return n > 0 ? values[n - 1] : least;
}

/* The least of the largest of values[0..n) (which it reorders) that reach `rank` of them
 * (counting ties; with by_mass, whose sum reaches `rank`): quickselect. If rounding leaves
 * a sum out of reach, the least value. Median-of-three pivots take about log2(n) rounds on
 * any order a model's logits give, but an adversarial order takes n / 2 rounds of n: past
 * a budget of rounds the rest is sorted instead (as introselect does). */
static float select_largest(float *values, int64_t n, double rank, int by_mass) {
    float least = 0.0f;
    int rounds_left = n > 0 ? 2 * (64 - __builtin_clzll((unsigned long long)n)) + 16 : 0;
    while (n > 0) {
        if (rounds_left-- == 0) return select_by_sorting(values, n, rank, by_mass, least);
        const float pivot = median_of_three(values, n);
        int64_t above, equal;
        double above_sum;
        partition(values, n, pivot, &above, &equal, &above_sum);
        const double above_size = by_mass ? above_sum : (double)above;
        if (above_size >= rank) {
            n = above;
            continue;
        }
        least = pivot;
        const double through_pivot = above_size + (by_mass ? (double)equal * pivot : (double)equal);
        if (through_pivot >= rank) break;
        rank -= through_pivot;
        values += above + equal;
        n -= above + equal;
    }
    return least;
}

/* The thresholds of top-k and top-p: the least weight to keep among the largest of
 * weights[0..vocab) at or above `least` that reach `rank` of them (by count; with by_mass,
 * by sum), or `least` where they all fall short. Two ways to find it, both selections: */

/* (1) A histogram of the weights' leading bits finds the bucket that holds it, and a
 * quickselect over that bucket the weight: two passes over every weight. The histogram is
 * kept in COPIES interleaved parts: neighbouring weights often share a bucket, and adding
 * to one part after another would wait on each addition. */
enum { COPIES = 4 };

static inline __attribute__((always_inline)) float threshold_by_histogram(const float *weights, int64_t vocab,
                                                                          float least, double rank, int by_mass,
                                                                          float *scratch, double *histogram) {
    memset(histogram, 0, COPIES * BUCKETS * sizeof *histogram);
    for (int64_t i = 0; i < vocab; i++) {
        const float w = weights[i] >= least ? weights[i] : 0.0f;
        histogram[(i % COPIES) * BUCKETS + bucket_of(w)] += by_mass ? (double)w : (double)(w > 0.0f);
    }
    int32_t bucket = BUCKETS - 1;
    for (; bucket > 0; bucket--) {
        double in_bucket = 0.0;
        for (int copy = 0; copy < COPIES; copy++) in_bucket += histogram[copy * BUCKETS + bucket];
        if (in_bucket >= rank) break;
        rank -= in_bucket;
    }
    if (bucket == 0) return least; /* out of reach (fewer tokens than rank, or rounding): keep them all */
    int64_t n = 0;
    for (int64_t i = 0; i < vocab; i++) {
        scratch[n] = weights[i];
        n += bucket_of(weights[i]) == bucket;
    }
    return select_largest(scratch, n, rank, by_mass);
}

/* (2) Where the maxima of `groups` groups of weights reach `rank` by themselves (a peaked
 * softmax, or a small top-k), the least of those that do bounds the threshold from below:
 * they are distinct weights. Only the groups whose maximum reaches the bound (few) can hold
 * weights above the threshold, and a quickselect over their weights that reach it finds
 * it: one vectorised pass over every weight. Returns -1 where the maxima fall short. */
static inline __attribute__((always_inline)) float threshold_by_groups(const float *weights, int64_t vocab,
                                                                       float least, double rank, int by_mass,
                                                                       int64_t groups, float *scratch,
                                                                       float *group_max) {
    const int64_t size = vocab / groups;
    double reach = 0.0;
    for (int64_t group = 0; group < groups; group++) {
        const int64_t end = group + 1 < groups ? (group + 1) * size : vocab;
        uint32_t top = 0; /* weights are >= 0, so their bits order as they do */
        for (int64_t i = group * size; i < end; i++) {
            uint32_t bits;
            memcpy(&bits, &weights[i], sizeof bits);
            top = bits > top ? bits : top;
        }
        memcpy(&group_max[group], &top, sizeof top);
        group_max[group] = group_max[group] >= least ? group_max[group] : 0.0f;
        reach += by_mass ? (double)group_max[group] : (double)(group_max[group] > 0.0f);
    }
    if (reach < rank) return -1.0f;
    memcpy(scratch, group_max, (size_t)groups * sizeof *scratch);
    const float bound = select_largest(scratch, groups, rank, by_mass); /* > 0, and >= least */
    int64_t n = 0;
    for (int64_t group = 0; group < groups; group++) {
        if (group_max[group] < bound) continue;
        const int64_t end = group + 1 < groups ? (group + 1) * size : vocab;
        for (int64_t i = group * size; i < end; i++) {
            scratch[n] = weights[i];
            n += weights[i] >= bound;
        }
    }
    return select_largest(scratch, n, rank, by_mass);
}

/* Groups for top-k: 8k (about k reach the bound, and about 2k weights in them), of at
 * least GROUP_SIZE weights; for top-p, groups of GROUP_SIZE. */
enum { GROUP_SIZE = 64 };

static inline __attribute__((always_inline)) float threshold_of(const float *weights, int64_t vocab, float least,
                                                                double rank, int by_mass, float *scratch,
                                                                float *group_max, double *histogram) {
    int64_t groups = vocab / GROUP_SIZE;
    if (!by_mass) groups = 8 * rank < groups ? (int64_t)(8 * rank) : groups;
    const float threshold = groups >= 2 && (by_mass || groups >= 2 * rank)
                                ? threshold_by_groups(weights, vocab, least, rank, by_mass, groups, scratch, group_max)
                                : -1.0f;
    return threshold >= 0.0f ? threshold
                             : threshold_by_histogram(weights, vocab, least, rank, by_mass, scratch, histogram);
}

enum { BLOCK = 256 }; /* the inverse CDF sums blocks of this many weights, then walks one */

/* One call's requests: their settings, each at its index r, and where their tokens go. */
struct batch {
    const void *logits;
    const int64_t *rows, *top_ks;
    int64_t vocab;
    int dtype;
    const float *temperatures, *min_ps, *top_ps;
    const double *draws;
    int64_t *out;
};

/* One thread's working memory: a row of weights, a scratch row, the group maxima, the
 * histogram and the inverse CDF's block sums. */
struct memory {
    float *weights, *scratch, *group_max;
    double *histogram, *block_sums;
};

/* Draws one token from a row of logits. */
static inline __attribute__((always_inline)) int64_t sample_row(const struct memory *memory, const void *row,
                                                                int64_t vocab, const int dtype, float temperature,
                                                                int64_t top_k, float min_p, float top_p, double draw) {
    float *weights = memory->weights, *scratch = memory->scratch, *group_max = memory->group_max;
    double *histogram = memory->histogram, *block_sums = memory->block_sums;
    const int64_t best = first_maximum(row, vocab, dtype);
    const float highest = load(row, best, dtype) / temperature; /* dividing by t > 0 keeps the order */
    if (!(highest > -INFINITY && highest < INFINITY)) return best; /* a broken model's row: its argmax */
    for (int64_t i = 0; i < vocab; i++) weights[i] = exp_nonpositive(load(row, i, dtype) / temperature - highest);
    float least = min_p; /* the largest weight is exp(0) = 1: min-p keeps what reaches min_p itself */
    if (top_k > 0 && top_k < vocab) {
        const float kth = threshold_of(weights, vocab, least, (double)top_k, 0, scratch, group_max, histogram);
        least = kth > least ? kth : least;
    }
    if (top_p < 1.0f) {
        double total = 0.0;
        for (int64_t i = 0; i < vocab; i++) total += weights[i] >= least ? weights[i] : 0.0f;
        const float nucleus = threshold_of(weights, vocab, least, (double)top_p * total, 1, scratch, group_max,
                                           histogram);
        least = nucleus > least ? nucleus : least; /* top-k and min-p stay, whatever rounding does */
    }
    const int64_t blocks = (vocab + BLOCK - 1) / BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t end = (b + 1) * BLOCK < vocab ? (b + 1) * BLOCK : vocab;
        double sum = 0.0;
        for (int64_t i = b * BLOCK; i < end; i++) sum += weights[i] >= least ? weights[i] : 0.0f;
        block_sums[b] = sum;
        total += sum;
    }
    const double target = draw * total;
    double before = 0.0;
    int64_t b = 0;
    while (b + 1 < blocks && before + block_sums[b] <= target) before += block_sums[b++];
    int64_t last_live = best;
    for (int64_t i = b * BLOCK; i < vocab; i++) { /* past the block only where rounding leaves the target beyond it */
        if (weights[i] <= 0.0f || weights[i] < least) continue;
        last_live = i;
        before += weights[i];
        if (before > target) return i;
    }
    return last_live;
}

/* Rows first..last-1 of the batch. One compiled variant per instruction set (the loader
 * picks the widest the CPU has), with sample_row inlined once per dtype. */
MULTIVERSION static void sample_rows(const struct batch *batch, const struct memory *memory, int64_t first,
                                     int64_t last) {
    const int64_t vocab = batch->vocab, row_bytes = vocab * (batch->dtype == FLOAT32 ? 4 : 2);
    for (int64_t r = first; r < last; r++) {
        const void *row = (const char *)batch->logits + batch->rows[r] * row_bytes;
        const float t = batch->temperatures[r], m = batch->min_ps[r], p = batch->top_ps[r];
        const int64_t k = batch->top_ks[r];
        batch->out[batch->rows[r]] = batch->dtype == FLOAT32
                                         ? sample_row(memory, row, vocab, FLOAT32, t, k, m, p, batch->draws[r])
                                         : sample_row(memory, row, vocab, BFLOAT16, t, k, m, p, batch->draws[r]);
    }
}

/* A slice of the batch's rows (see run_slices), in working memory of its own. */
static int sample_slice(const void *args, int64_t first, int64_t last) {
    const struct batch *batch = args;
    const int64_t vocab = batch->vocab;
    const struct memory memory = {
        .weights = malloc((size_t)vocab * sizeof(float)), .scratch = malloc((size_t)vocab * sizeof(float)),
        .group_max = malloc((size_t)(vocab / GROUP_SIZE + 1) * sizeof(float)),
        .histogram = malloc(COPIES * BUCKETS * sizeof(double)),
        .block_sums = malloc((size_t)((vocab + BLOCK - 1) / BLOCK) * sizeof(double)),
    };
    const int allocated = memory.weights && memory.scratch && memory.group_max && memory.histogram &&
                          memory.block_sums;
    if (allocated) sample_rows(batch, &memory, first, last);
    free(memory.weights), free(memory.scratch), free(memory.group_max), free(memory.histogram),
        free(memory.block_sums);
    return allocated ? 0 : -1;
}

/* sample(logits, rows, count, vocab, dtype, temperatures, top_ks, min_ps, top_ps, draws, out,
 * threads): for r < count, out[rows[r]] (int64) = the token drawn from row rows[r] of the
 * contiguous [?, vocab] logits with temperature (> 0; float32), top_k (int64; off where
 * not in (0, vocab)), min_p and top_p (float32) and draw (float64 in [0, 1)), each at
 * index r; the rows split into up to `threads` slices (see run_slices). */
static PyObject *sample(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long logits, rows, temperatures, top_ks, min_ps, top_ps, draws, out;
    Py_ssize_t count, vocab;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KKnniKKKKKKi", &logits, &rows, &count, &vocab, &dtype, &temperatures, &top_ks,
                          &min_ps, &top_ps, &draws, &out, &threads))
        return NULL;
    const struct batch batch = {
        .logits = (const void *)(uintptr_t)logits, .rows = (const int64_t *)(uintptr_t)rows,
        .top_ks = (const int64_t *)(uintptr_t)top_ks, .vocab = vocab, .dtype = dtype,
        .temperatures = (const float *)(uintptr_t)temperatures, .min_ps = (const float *)(uintptr_t)min_ps,
        .top_ps = (const float *)(uintptr_t)top_ps, .draws = (const double *)(uintptr_t)draws,
        .out = (int64_t *)(uintptr_t)out,
    };
    const int slices = (int)(threads < count ? threads : count);
    int64_t *bounds = malloc(2 * (size_t)(slices > 0 ? slices : 1) * sizeof *bounds);
    if (bounds == NULL) return PyErr_NoMemory();
    for (int s = 0; s < slices; s++) bounds[2 * s] = count * s / slices, bounds[2 * s + 1] = count * (s + 1) / slices;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_slices(sample_slice, &batch, bounds, slices);
    Py_END_ALLOW_THREADS
    free(bounds);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sample", sample, METH_VARARGS, "Draw one token per row of float32 or bfloat16 logits."},
    {"use_openmp", use_openmp, METH_VARARGS, "Run slices as parallel regions of this OpenMP runtime."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sampling", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sampling(void) { return create_module(&module, NULL); }
