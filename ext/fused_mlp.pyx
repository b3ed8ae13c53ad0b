# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused decode kernels for the ``fused`` backend (C in ``ext/fused_kernels.h``).

Pointers are passed as integers (``tensor.data_ptr()``, 0 for "none"); the Python wrapper
in ``sparsebench.backends.fused`` checks shapes, dtypes, devices and contiguity first.
The GIL is released while the kernels run.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t

cdef extern from "fused_kernels.h" nogil:
    int64_t sb_mlp_token(const float* x, int64_t H, int64_t I, const void* gate, const void* up,
                         const void* down_t, int dtype, const float* gate_bias, const float* up_bias,
                         const float* down_bias, int gated, int mode, const float* given, const uint8_t* mask,
                         int use_threshold, float threshold, int act, float act_param, int up_act,
                         int32_t* idx, float* h, float* act_all, float* y, int threads, int simd)
    int64_t sb_linear_token(const float* x, int64_t n_in, int64_t n_out, const void* wt, int dtype,
                            const float* bias, const uint8_t* mask, int use_threshold, float threshold,
                            int32_t* idx, float* coef, float* y, int threads, int simd)
    int sb_have_avx2()

DTYPE_F32 = 0
DTYPE_BF16 = 1
FROM_X = 0
GIVEN_ACT = 1
GIVEN_H = 2
ACTIVATIONS = {"identity": 0, "silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4, "fatrelu": 5}


def have_avx2():
    """Whether this CPU runs the AVX2/FMA loops (otherwise the portable ones run)."""
    return bool(sb_have_avx2())


def mlp_token(int64_t x, int64_t hidden, int64_t inter, int64_t gate, int64_t up, int64_t down_t, int dtype,
              int64_t gate_bias, int64_t up_bias, int64_t down_bias, int gated, int mode, int64_t given,
              int64_t mask, int use_threshold, float threshold, int act, float act_param, int up_act,
              int64_t idx, int64_t h, int64_t act_all, int64_t y, int threads, int simd):
    """One MLP call for one token (see ``sb_mlp_token``); returns the number of active neurons."""
    cdef int64_t k
    with nogil:
        k = sb_mlp_token(<const float*> <uintptr_t> x, hidden, inter, <const void*> <uintptr_t> gate,
                         <const void*> <uintptr_t> up, <const void*> <uintptr_t> down_t, dtype,
                         <const float*> <uintptr_t> gate_bias, <const float*> <uintptr_t> up_bias,
                         <const float*> <uintptr_t> down_bias, gated, mode, <const float*> <uintptr_t> given,
                         <const uint8_t*> <uintptr_t> mask, use_threshold, threshold, act, act_param, up_act,
                         <int32_t*> <uintptr_t> idx, <float*> <uintptr_t> h, <float*> <uintptr_t> act_all,
                         <float*> <uintptr_t> y, threads, simd)
    return k


def linear_token(int64_t x, int64_t n_in, int64_t n_out, int64_t wt, int dtype, int64_t bias, int64_t mask,
                 int use_threshold, float threshold, int64_t idx, int64_t coef, int64_t y, int threads, int simd):
    """One input-sparse linear for one token (see ``sb_linear_token``); returns the active channels."""
    cdef int64_t k
    with nogil:
        k = sb_linear_token(<const float*> <uintptr_t> x, n_in, n_out, <const void*> <uintptr_t> wt, dtype,
                            <const float*> <uintptr_t> bias, <const uint8_t*> <uintptr_t> mask, use_threshold,
                            threshold, <int32_t*> <uintptr_t> idx, <float*> <uintptr_t> coef,
                            <float*> <uintptr_t> y, threads, simd)
    return k
