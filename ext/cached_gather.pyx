# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Row cache update for the ``cached`` backend: copy only the rows that changed.

A cache holds the weight rows of the currently active neurons in compact slots
``0..k-1``. Given the next token's mask, :func:`update` frees the slots of neurons
that left, fills them with neurons that entered and, when the active set shrinks,
moves the few kept neurons that sit beyond the new end down into the holes, so the
cache stays compact. Rows are copied with ``memcpy`` as raw bytes, so any dtype
(fp32, bf16, ...) is copied bit-exactly.

Work per call: one byte scan of the mask (O(intermediate), a few microseconds),
O(k_old) integer bookkeeping, and row copies only for neurons that entered plus at most
as many moves as neurons that left, i.e. O(changed rows). The copies run in an OpenMP
loop with an explicit thread count (torch shares the same libgomp).

Pointers are passed as integers (``tensor.data_ptr()``); the Python wrapper in
``sparsebench.backends.cached`` checks shapes, dtypes and contiguity first.
"""
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy

ctypedef char* cptr


def update(
    int64_t mask_addr,        # uint8/bool [n_neurons]: 1 = active for the next token
    int64_t n_neurons,
    int64_t k_old,            # slots 0..k_old-1 hold the previous active set
    int64_t slot_of_addr,     # int32 [n_neurons]: slot of each neuron, -1 when not cached
    int64_t neuron_of_addr,   # int32 [capacity]: neuron held by each slot
    int64_t jobs_addr,        # int32 [2 * n_neurons] scratch: (neuron, slot) pairs to copy
    int64_t holes_addr,       # int32 [n_neurons] scratch
    int64_t[:, ::1] planes,   # one row per plane: src, src_stride, dst, dst_stride, row_bytes (bytes)
    int num_threads,
):
    """Make slots 0..k_new-1 hold exactly the active neurons; returns (k_new, rows_copied)."""
    cdef uint8_t* mask = <uint8_t*> mask_addr
    cdef int32_t* slot_of = <int32_t*> slot_of_addr
    cdef int32_t* neuron_of = <int32_t*> neuron_of_addr
    cdef int32_t* jobs = <int32_t*> jobs_addr
    cdef int32_t* holes = <int32_t*> holes_addr
    cdef int64_t n, s, j, p, k_new = 0, n_holes = 0, n_jobs = 0, n_planes = planes.shape[0]
    cdef int64_t src, src_stride, dst, dst_stride, row_bytes

    with nogil:
        for n in range(n_neurons):
            k_new += mask[n] != 0
        # Slots below k_new whose neuron left (or that were empty) are holes; neurons that
        # stay but sit at or beyond k_new must move down; neurons that left beyond k_new
        # are simply forgotten.
        for s in range(k_old):
            n = neuron_of[s]
            if mask[n]:
                if s >= k_new:
                    jobs[2 * n_jobs] = <int32_t> n  # a mover: placed into a hole below
                    n_jobs += 1
            else:
                slot_of[n] = -1
                if s < k_new:
                    holes[n_holes] = <int32_t> s
                    n_holes += 1
        for s in range(k_old, k_new):
            holes[n_holes] = <int32_t> s
            n_holes += 1
        # Neurons that entered: active but not cached.
        for n in range(n_neurons):
            if mask[n] and slot_of[n] < 0:
                jobs[2 * n_jobs] = <int32_t> n
                n_jobs += 1
        # n_jobs == n_holes by construction: every slot below k_new gets exactly one neuron.
        for j in range(n_jobs):
            n = jobs[2 * j]
            s = holes[j]
            jobs[2 * j + 1] = <int32_t> s
            slot_of[n] = <int32_t> s
            neuron_of[s] = <int32_t> n
        # Copy every job's row of every plane from the source weights (a mover's row is the
        # same bytes whether read from the weights or from its old slot).
        for j in prange(n_jobs, num_threads=num_threads, schedule="static"):
            for p in range(n_planes):
                src = planes[p, 0]
                src_stride = planes[p, 1]
                dst = planes[p, 2]
                dst_stride = planes[p, 3]
                row_bytes = planes[p, 4]
                memcpy(<cptr> (dst + jobs[2 * j + 1] * dst_stride),
                       <cptr> (src + jobs[2 * j] * src_stride), row_bytes)
    return k_new, n_jobs


def gather_rows(
    int64_t idx_addr,         # int64 [k]: rows to gather
    int64_t k,
    int64_t[:, ::1] planes,   # src, src_stride, dst, dst_stride, row_bytes (bytes)
    int num_threads,
):
    """dst[j] = src[idx[j]] for every plane: a full gather (what a cache miss on every
    active row costs); used to benchmark the copy-bound limit with the same memcpy."""
    cdef int64_t* idx = <int64_t*> idx_addr
    cdef int64_t j, p, n_planes = planes.shape[0]
    with nogil:
        for j in prange(k, num_threads=num_threads, schedule="static"):
            for p in range(n_planes):
                memcpy(<cptr> (planes[p, 2] + j * planes[p, 3]),
                       <cptr> (planes[p, 0] + idx[j] * planes[p, 1]), planes[p, 4])
