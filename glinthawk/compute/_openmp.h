/* Slices of work on torch's own OpenMP threads, for the C kernels.
 *
 * After a matmul, torch's libgomp workers spin before they sleep; a kernel that hands its
 * slices to that team (one parallel region) takes those threads, where threads of its own
 * would wait for the cores the spinning workers hold. The Python side finds the runtime
 * torch loaded (glinthawk/threads.py: hook_openmp) and hands each module its entry points
 * (use_openmp); without them, run_slices runs the slices in turn on the calling thread.
 * Each including module keeps its own copy of these statics.
 */
#ifndef GLINTHAWK_OPENMP_H
#define GLINTHAWK_OPENMP_H

#include <Python.h> /* after the module's own #define PY_SSIZE_T_CLEAN */
#include <stdint.h>

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_query_fn)(void);
static gomp_parallel_fn gomp_parallel;  /* libgomp's GOMP_parallel, as loaded by torch */
static omp_query_fn omp_thread_num, omp_num_threads;

/* use_openmp(GOMP_parallel, omp_get_thread_num, omp_get_num_threads): addresses in the
 * OpenMP runtime torch uses; 0, 0, 0 goes back to one slice per call. */
static PyObject *use_openmp(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long parallel, thread_num, num_threads;
    if (!PyArg_ParseTuple(args, "KKK", &parallel, &thread_num, &num_threads)) return NULL;
    const int all = parallel && thread_num && num_threads;
    gomp_parallel = all ? (gomp_parallel_fn)(uintptr_t)parallel : NULL;
    omp_thread_num = all ? (omp_query_fn)(uintptr_t)thread_num : NULL;
    omp_num_threads = all ? (omp_query_fn)(uintptr_t)num_threads : NULL;
    Py_RETURN_NONE;
}

/* Runs items first..last-1; returns 0, or -1 when it could not allocate its scratch. */
typedef int (*slice_fn)(const void *args, int64_t first, int64_t last);

typedef struct {
    slice_fn run;
    const void *args;
    const int64_t *slices;  /* [count][2]: first, last */
    int count;
    int failed;
} slice_job;

static void slice_worker(void *data) {
    slice_job *job = data;
    for (int s = omp_thread_num(); s < job->count; s += omp_num_threads())
        if (job->run(job->args, job->slices[2 * s], job->slices[2 * s + 1]) != 0)
            __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
}

/* Every slice, as one parallel region (a team may come out smaller than asked: each thread
 * takes every n-th slice), or in turn on this thread when there is one slice or no
 * runtime. Called without the GIL; returns -1 if a slice ran out of memory. */
static int run_slices(slice_fn run, const void *args, const int64_t *slices, int count) {
    slice_job job = {run, args, slices, count, 0};
    if (count > 1 && gomp_parallel != NULL) {
        gomp_parallel(slice_worker, &job, (unsigned)count, 0);
    } else {
        for (int s = 0; s < count; s++)
            if (run(args, slices[2 * s], slices[2 * s + 1]) != 0) job.failed = 1;
    }
    return job.failed ? -1 : 0;
}

#endif
