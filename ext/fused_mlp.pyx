# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused decode kernels for the ``fused`` backend.

The C source is the verbatim block below (kept in this file so that the provenance record
of a run, which hashes the ``.pyx`` of every extension it imports, covers the kernels).

Pointers are passed as integers (``tensor.data_ptr()``, 0 for "none"); the Python wrapper
in ``sparsebench.backends.fused`` checks shapes, dtypes, devices and contiguity first.
The GIL is released while the kernels run.
"""
from cpython.ref cimport Py_REFCNT
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from * nogil:
    """
    /* Fused sparse kernels for one decode token: read the active weight rows in place.
     *
     * At batch-1 decode the weights sit in DRAM and every byte read costs time, so the
     * kernels read exactly the rows of the active neurons (gate/up rows of [I, H]
     * matrices, rows of the transposed down matrix) where they lie: no gather into a
     * compact buffer, no mask tensor handed back to Python, no nonzero().
     *
     *   phase 1  (threads split the active neurons)   h_j = act(g_j) * up_act(u_j)
     *   phase 2  (threads split the output columns)   y[c0:c1] = sum_j h_j * down_t[j, c0:c1]
     *
     * Phase 2 is race-free without atomics or a reduction: each thread owns a slice of y
     * and streams the same slice of every active down row. The mask can be given (bytes),
     * absent (dense path through the same code), or computed in-kernel from a threshold on
     * something the kernel computes anyway (CATS: |act(gate)| > t; input-sparse linears:
     * |x| > t), so a decode step needs no extra pass.
     *
     * Weights are fp32 or bf16 (raw uint16, widened to fp32 in registers); inputs,
     * biases, accumulation and outputs are fp32. Each hot loop has an AVX2/FMA version
     * (compiled with a function-level target attribute) and a portable one; the AVX2 one
     * is chosen at run time when the CPU has it, unless the caller asks for the portable
     * path (tests compare both). OpenMP thread counts are always passed explicitly: torch
     * shares the same libgomp.
     */

    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #include <omp.h>

    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #define SB_X86 1
    #else
    #define SB_X86 0
    #endif

    enum { SB_F32 = 0, SB_BF16 = 1 };
    enum { SB_ACT_IDENTITY = 0, SB_ACT_SILU = 1, SB_ACT_GELU_TANH = 2, SB_ACT_GELU = 3, SB_ACT_RELU = 4,
           SB_ACT_FATRELU = 5 };
    /* What the caller already computed (the sparsifier's work is reused, never redone). */
    enum { SB_FROM_X = 0,      /* gated: gate and up rows here; plain: up (fc1) rows here */
           SB_GIVEN_ACT = 1,   /* gated: act(gate) given for every neuron, up rows here */
           SB_GIVEN_H = 2 };   /* h given: only down rows here */

    static inline float sb_act(int kind, float z, float param) {
        switch (kind) {
        case SB_ACT_SILU: return z / (1.0f + expf(-z));
        case SB_ACT_GELU_TANH: {
            const float c = 0.7978845608028654f; /* sqrt(2/pi) */
            return 0.5f * z * (1.0f + tanhf(c * (z + 0.044715f * z * z * z)));
        }
        case SB_ACT_GELU: return 0.5f * z * (1.0f + erff(z * 0.7071067811865476f));
        case SB_ACT_RELU: return z > 0.0f ? z : 0.0f;
        case SB_ACT_FATRELU: return z >= param ? z : 0.0f;
        default: return z;
        }
    }

    static inline float sb_bf16_to_f32(uint16_t v) {
        uint32_t bits = ((uint32_t)v) << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }

    /* ------------------------------------------------------------------ portable loops */

    static float sb_dot_portable(const void* row, int dtype, const float* x, int64_t n) {
        float acc[8] = {0};
        int64_t i = 0;
        if (dtype == SB_F32) {
            const float* w = (const float*)row;
            for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++) acc[l] += w[i + l] * x[i + l];
            for (; i < n; i++) acc[0] += w[i] * x[i];
        } else {
            const uint16_t* w = (const uint16_t*)row;
            for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++) acc[l] += sb_bf16_to_f32(w[i + l]) * x[i + l];
            for (; i < n; i++) acc[0] += sb_bf16_to_f32(w[i]) * x[i];
        }
        return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }

    /* y[0:n] += sum_r coef[r] * rows[r][0:n] for r < nrows (rows are pointers to element 0 of the slice) */
    static void sb_axpy_portable(float* y, const void* const* rows, const float* coef, int nrows, int dtype, int64_t n) {
        for (int r = 0; r < nrows; r++) {
            const float c = coef[r];
            if (dtype == SB_F32) {
                const float* w = (const float*)rows[r];
                for (int64_t i = 0; i < n; i++) y[i] += c * w[i];
            } else {
                const uint16_t* w = (const uint16_t*)rows[r];
                for (int64_t i = 0; i < n; i++) y[i] += c * sb_bf16_to_f32(w[i]);
            }
        }
    }

    /* ------------------------------------------------------------------ AVX2/FMA loops */
    #if SB_X86
    #define SB_AVX2 __attribute__((target("avx2,fma")))

    SB_AVX2 static inline __m256 sb_load8(const void* row, int dtype, int64_t i) {
        if (dtype == SB_F32) return _mm256_loadu_ps((const float*)row + i);
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)row + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }

    SB_AVX2 static inline float sb_hsum(__m256 v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        return _mm_cvtss_f32(s);
    }

    /* Two dot products against the same x (gate and up rows of one neuron) in one pass. */
    SB_AVX2 static void sb_dot2_avx2(const void* r0, const void* r1, int dtype, const float* x, int64_t n,
                                     float* out0, float* out1) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            a0 = _mm256_fmadd_ps(sb_load8(r0, dtype, i), x0, a0);
            a1 = _mm256_fmadd_ps(sb_load8(r0, dtype, i + 8), x1, a1);
            if (r1) {
                b0 = _mm256_fmadd_ps(sb_load8(r1, dtype, i), x0, b0);
                b1 = _mm256_fmadd_ps(sb_load8(r1, dtype, i + 8), x1, b1);
            }
        }
        for (; i + 8 <= n; i += 8) {
            __m256 x0 = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(sb_load8(r0, dtype, i), x0, a0);
            if (r1) b0 = _mm256_fmadd_ps(sb_load8(r1, dtype, i), x0, b0);
        }
        float s0 = sb_hsum(_mm256_add_ps(a0, a1)), s1 = r1 ? sb_hsum(_mm256_add_ps(b0, b1)) : 0.0f;
        for (; i < n; i++) {
            float xi = x[i];
            s0 += (dtype == SB_F32 ? ((const float*)r0)[i] : sb_bf16_to_f32(((const uint16_t*)r0)[i])) * xi;
            if (r1) s1 += (dtype == SB_F32 ? ((const float*)r1)[i] : sb_bf16_to_f32(((const uint16_t*)r1)[i])) * xi;
        }
        *out0 = s0;
        if (out1) *out1 = s1;
    }

    /* y[0:n] += sum_r coef[r] * rows[r][0:n], four rows per pass so y is loaded/stored once per four. */
    SB_AVX2 static void sb_axpy_avx2(float* y, const void* const* rows, const float* coef, int nrows, int dtype, int64_t n) {
        int r = 0;
        for (; r + 4 <= nrows; r += 4) {
            const __m256 c0 = _mm256_set1_ps(coef[r]), c1 = _mm256_set1_ps(coef[r + 1]);
            const __m256 c2 = _mm256_set1_ps(coef[r + 2]), c3 = _mm256_set1_ps(coef[r + 3]);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                __m256 acc = _mm256_loadu_ps(y + i);
                acc = _mm256_fmadd_ps(c0, sb_load8(rows[r], dtype, i), acc);
                acc = _mm256_fmadd_ps(c1, sb_load8(rows[r + 1], dtype, i), acc);
                acc = _mm256_fmadd_ps(c2, sb_load8(rows[r + 2], dtype, i), acc);
                acc = _mm256_fmadd_ps(c3, sb_load8(rows[r + 3], dtype, i), acc);
                _mm256_storeu_ps(y + i, acc);
            }
            for (; i < n; i++)
                for (int q = 0; q < 4; q++)
                    y[i] += coef[r + q] * (dtype == SB_F32 ? ((const float*)rows[r + q])[i]
                                                           : sb_bf16_to_f32(((const uint16_t*)rows[r + q])[i]));
        }
        for (; r < nrows; r++) {
            const __m256 c0 = _mm256_set1_ps(coef[r]);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8)
                _mm256_storeu_ps(y + i, _mm256_fmadd_ps(c0, sb_load8(rows[r], dtype, i), _mm256_loadu_ps(y + i)));
            if (i < n) {
                const void* tail = dtype == SB_F32 ? (const void*)((const float*)rows[r] + i)
                                                   : (const void*)((const uint16_t*)rows[r] + i);
                sb_axpy_portable(y + i, &tail, coef + r, 1, dtype, n - i);
            }
        }
    }
    #endif

    static int sb_have_avx2(void) {
    #if SB_X86
        static int cached = -1;
        if (cached < 0) {
            __builtin_cpu_init();
            cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        }
        return cached;
    #else
        return 0;
    #endif
    }

    static inline void sb_dot2(int simd, const void* r0, const void* r1, int dtype, const float* x, int64_t n,
                               float* out0, float* out1) {
    #if SB_X86
        if (simd) { sb_dot2_avx2(r0, r1, dtype, x, n, out0, out1); return; }
    #endif
        *out0 = sb_dot_portable(r0, dtype, x, n);
        if (r1) *out1 = sb_dot_portable(r1, dtype, x, n);
    }

    static inline void sb_axpy(int simd, float* y, const void* const* rows, const float* coef, int nrows, int dtype,
                               int64_t n) {
    #if SB_X86
        if (simd) { sb_axpy_avx2(y, rows, coef, nrows, dtype, n); return; }
    #endif
        sb_axpy_portable(y, rows, coef, nrows, dtype, n);
    }

    static inline const void* sb_row(const void* base, int dtype, int64_t row, int64_t width, int64_t col) {
        return dtype == SB_F32 ? (const void*)((const float*)base + row * width + col)
                               : (const void*)((const uint16_t*)base + row * width + col);
    }

    /* Column slice [c0, c1) of thread t out of nt, in multiples of 16 floats (one cache line). */
    static inline void sb_slice(int64_t n, int t, int nt, int64_t* c0, int64_t* c1) {
        int64_t blocks = (n + 15) / 16;
        int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        *c0 = b0 * 16 < n ? b0 * 16 : n;
        *c1 = b1 * 16 < n ? b1 * 16 : n;
    }

    /* Ask for the first cache lines of a row about to be read: rows of active neurons are scattered,
     * so each one starts with a DRAM miss the hardware prefetcher cannot foresee. */
    #define SB_PREFETCH_LINES 8
    static inline void sb_prefetch_row(const void* row, int64_t bytes) {
        const char* p = (const char*)row;
        int64_t n = bytes < SB_PREFETCH_LINES * 64 ? bytes : SB_PREFETCH_LINES * 64;
        for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 0);
    }

    #define SB_RULE_ACT 1
    #define SB_RULE_H 2

    /* weights read by one call (elements) below which it runs on one thread */
    #define SB_MIN_PARALLEL_WORK 32768

    static int64_t sb_compact(const uint8_t* mask, int64_t n, int32_t* idx) {
        int64_t k = 0;
        for (int64_t j = 0; j < n; j++)
            if (mask[j]) idx[k++] = (int32_t)j;
        return k;
    }

    /* sum over the active rows j: y[c0:c1] += coef[j] * rows[idx[j], c0:c1], in chunks of 4 rows */
    static void sb_accumulate_rows(int simd, float* y, const void* w, int dtype, int64_t width, const int32_t* idx,
                                   const float* coef, int64_t k, int64_t c0, int64_t c1) {
        const void* rows[4];
        float cs[4];
        int nr = 0;
        const int64_t slice_bytes = (c1 - c0) * (dtype == SB_F32 ? 4 : 2);
        for (int64_t p = 0; p < k; p++) {
            if (p + 4 < k) sb_prefetch_row(sb_row(w, dtype, idx[p + 4], width, c0), slice_bytes);
            if (coef[p] == 0.0f) continue; /* an inactive-by-value neuron (e.g. ReLU zero) moves no bytes */
            rows[nr] = sb_row(w, dtype, idx[p], width, c0);
            cs[nr++] = coef[p];
            if (nr == 4) { sb_axpy(simd, y + c0, rows, cs, 4, dtype, c1 - c0); nr = 0; }
        }
        if (nr) sb_axpy(simd, y + c0, rows, cs, nr, dtype, c1 - c0);
    }

    /* One MLP call for one token. Returns the number of active neurons.
     *
     *   mode        SB_FROM_X / SB_GIVEN_ACT / SB_GIVEN_H (what `given` holds, per neuron, width I)
     *   gated       1: h = act(gate x + bg) * up_act(up x + bu);  0 (OPT): h = act(up x + bu)
     *   mask        [I] bytes (1 = active); NULL: every neuron, or the threshold rule below
     *   rule        (mask NULL, SB_FROM_X) the mask made in-kernel: SB_RULE_ACT (gated): active =
     *               |act(gate x + bg)| > threshold, the gate computed for every neuron (CATS fused);
     *               SB_RULE_H: active = |h_j| >= thresholds[j], gate and up computed for every neuron
     *               (CETT fused); 0: none
     *   idx, h      scratch [I] int32 / float; on return idx[0:k] are the active neurons and h[0:k] their h
     *   act_all     scratch [I] float, used by the threshold rule only
     */
    static int64_t sb_mlp_token(const float* x, int64_t H, int64_t I, const void* gate, const void* up,
                                const void* down_t, int dtype, const float* gate_bias, const float* up_bias,
                                const float* down_bias, int gated, int mode, const float* given, const uint8_t* mask,
                                int rule, float threshold, const float* thresholds, int act, float act_param,
                                int up_act, int32_t* idx, float* h, float* act_all, float* y, int threads, int simd) {
        int64_t k = 0;
        simd = simd && sb_have_avx2();
        if (threads < 1) threads = 1;
        if (mask) {
            k = sb_compact(mask, I, idx);
        } else if (!rule) {
            for (int64_t j = 0; j < I; j++) idx[j] = (int32_t)j;
            k = I;
        }
        int64_t shared_k = k;
        /* a fork/join costs microseconds: small calls (tiny models, very sparse layers) stay serial */
        const int parallel = threads > 1 && (rule && !mask ? I : k) * H >= SB_MIN_PARALLEL_WORK;
        if (mask) rule = 0;
        #pragma omp parallel num_threads(threads) if(parallel)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            if (rule) {
                /* CATS fused: the gate of every neuron, then the rule, then up and down for the survivors;
                 * CETT fused: h of every neuron, then the rule, then down for the survivors */
                #pragma omp for schedule(static)
                for (int64_t j = 0; j < I; j++) {
                    float g = 0.0f, u = 0.0f;
                    if (rule == SB_RULE_H && gated) {
                        sb_dot2(simd, sb_row(gate, dtype, j, H, 0), sb_row(up, dtype, j, H, 0), dtype, x, H, &g, &u);
                        if (gate_bias) g += gate_bias[j];
                        if (up_bias) u += up_bias[j];
                        act_all[j] = sb_act(act, g, act_param) * sb_act(up_act, u, 0.0f);
                    } else if (rule == SB_RULE_H) {
                        sb_dot2(simd, sb_row(up, dtype, j, H, 0), NULL, dtype, x, H, &u, NULL);
                        if (up_bias) u += up_bias[j];
                        act_all[j] = sb_act(act, u, act_param);
                    } else {
                        sb_dot2(simd, sb_row(gate, dtype, j, H, 0), NULL, dtype, x, H, &g, NULL);
                        if (gate_bias) g += gate_bias[j];
                        act_all[j] = sb_act(act, g, act_param);
                    }
                }
                #pragma omp single
                {
                    int64_t n = 0;
                    if (rule == SB_RULE_H) {
                        for (int64_t j = 0; j < I; j++)
                            if (fabsf(act_all[j]) >= thresholds[j]) idx[n++] = (int32_t)j;
                    } else {
                        for (int64_t j = 0; j < I; j++)
                            if (fabsf(act_all[j]) > threshold) idx[n++] = (int32_t)j;
                    }
                    shared_k = n;
                }
            }
            const int64_t kk = shared_k;
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < kk; p++) {
                const int64_t j = idx[p];
                float g = 0.0f, u = 0.0f, a;
                if (p + 1 < kk && mode != SB_GIVEN_H && rule != SB_RULE_H) {
                    const int64_t row_bytes = H * (dtype == SB_F32 ? 4 : 2);
                    sb_prefetch_row(sb_row(up, dtype, idx[p + 1], H, 0), row_bytes);
                    if (gated && mode == SB_FROM_X && !rule)
                        sb_prefetch_row(sb_row(gate, dtype, idx[p + 1], H, 0), row_bytes);
                }
                if (mode == SB_GIVEN_H || rule == SB_RULE_H) {
                    h[p] = rule == SB_RULE_H ? act_all[j] : given[j];
                    continue;
                }
                if (gated && mode == SB_FROM_X && !rule) {
                    sb_dot2(simd, sb_row(gate, dtype, j, H, 0), sb_row(up, dtype, j, H, 0), dtype, x, H, &g, &u);
                    if (gate_bias) g += gate_bias[j];
                    a = sb_act(act, g, act_param);
                } else {
                    sb_dot2(simd, sb_row(up, dtype, j, H, 0), NULL, dtype, x, H, &u, NULL);
                    if (!gated) {
                        if (up_bias) u += up_bias[j];
                        h[p] = sb_act(act, u, act_param);
                        continue;
                    }
                    a = rule ? act_all[j] : given[j];
                }
                if (up_bias) u += up_bias[j];
                h[p] = a * sb_act(up_act, u, 0.0f);
            }
            /* implicit barrier: every h is ready */
            int64_t c0, c1;
            sb_slice(H, t, nt, &c0, &c1);
            if (c1 > c0) {
                if (down_bias) memcpy(y + c0, down_bias + c0, (size_t)(c1 - c0) * sizeof(float));
                else memset(y + c0, 0, (size_t)(c1 - c0) * sizeof(float));
                sb_accumulate_rows(simd, y, down_t, dtype, H, idx, h, kk, c0, c1);
            }
        }
        return shared_k;
    }

    /* y = bias + sum over p < k of coef[p] * wt[idx[p]] (wt [n_in, n_out]), threads splitting the columns */
    static void sb_linear_rows(int64_t n_out, const void* wt, int dtype, const float* bias, const int32_t* idx,
                               const float* coef, int64_t k, float* y, int threads, int simd) {
        #pragma omp parallel num_threads(threads) if(threads > 1 && k * n_out >= SB_MIN_PARALLEL_WORK)
        {
            int64_t c0, c1;
            sb_slice(n_out, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
            if (c1 > c0) {
                if (bias) memcpy(y + c0, bias + c0, (size_t)(c1 - c0) * sizeof(float));
                else memset(y + c0, 0, (size_t)(c1 - c0) * sizeof(float));
                sb_accumulate_rows(simd, y, wt, dtype, n_out, idx, coef, k, c0, c1);
            }
        }
    }

    /* One input-sparse linear for one token: y = sum over active input channels j of x_j * wt[j] (+ bias),
     * wt = W^T stored [n_in, n_out]. Active: mask[j] != 0, or |x_j| > threshold when mask is NULL and
     * use_threshold (TEAL fused), or every channel (dense path). Returns the number of active channels. */
    static int64_t sb_linear_token(const float* x, int64_t n_in, int64_t n_out, const void* wt, int dtype,
                                   const float* bias, const uint8_t* mask, int use_threshold, float threshold,
                                   int32_t* idx, float* coef, float* y, int threads, int simd) {
        int64_t k = 0;
        simd = simd && sb_have_avx2();
        if (threads < 1) threads = 1;
        for (int64_t j = 0; j < n_in; j++) {
            int on = mask ? mask[j] != 0 : (use_threshold ? fabsf(x[j]) > threshold : 1);
            if (on) { idx[k] = (int32_t)j; coef[k++] = x[j]; }
        }
        sb_linear_rows(n_out, wt, dtype, bias, idx, coef, k, y, threads, simd);
        return k;
    }

    /* The k-th largest of a[0:n] (1 <= k <= n), by quickselect; reorders a. */
    static float sb_kth_largest(float* a, int64_t n, int64_t k) {
        int64_t lo = 0, hi = n - 1, want = k - 1; /* index of the answer in descending order */
        while (lo < hi) {
            const float pivot = a[lo + (hi - lo) / 2];
            int64_t i = lo, j = hi;
            while (i <= j) {
                while (a[i] > pivot) i++;
                while (a[j] < pivot) j--;
                if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
            }
            if (want <= j) hi = j;
            else if (want >= i) lo = i;
            else return a[want];
        }
        return a[want];
    }

    /* The active channels of one input-sparse linear into idx/coef, and their count: the `keep` largest
     * s_j = |x_j| * w[j] (w NULL: |x_j|) when keep >= 0, ties to the lower index — a stable descending
     * sort's first `keep` (WINA) —, |x_j| > threshold (TEAL) when keep == -1, every channel when
     * keep < -1 (a dense linear). scores and work: scratch [n_in]. */
    static int64_t sb_select(const float* x, int64_t n_in, float threshold, int64_t keep, const float* w,
                             float* scores, float* work, int32_t* idx, float* coef) {
        int64_t k = 0;
        if (keep < -1) { /* a dense linear: every channel */
            for (int64_t j = 0; j < n_in; j++) { idx[j] = (int32_t)j; coef[j] = x[j]; }
            return n_in;
        }
        if (keep < 0) {
            for (int64_t j = 0; j < n_in; j++)
                if (fabsf(x[j]) > threshold) { idx[k] = (int32_t)j; coef[k++] = x[j]; }
            return k;
        }
        if (keep > n_in) keep = n_in;
        if (keep == 0) return 0;
        for (int64_t j = 0; j < n_in; j++) scores[j] = work[j] = w ? fabsf(x[j]) * w[j] : fabsf(x[j]);
        const float v = sb_kth_largest(work, n_in, keep);
        int64_t above = 0;
        for (int64_t j = 0; j < n_in; j++) above += scores[j] > v;
        int64_t ties = keep - above; /* channels scoring exactly v that are kept: the lowest indices */
        for (int64_t j = 0; j < n_in; j++)
            if (scores[j] > v || (scores[j] == v && ties-- > 0)) { idx[k] = (int32_t)j; coef[k++] = x[j]; }
        return k;
    }

    /* One input-sparse linear for one token whose active channels are the `keep` largest scores
     * s_j = |x_j| * w[j] (w NULL: |x_j|), ties to the lower index (sb_select; WINA fused). scores and
     * work are scratch [n_in]. Returns the active channels. */
    static int64_t sb_linear_topk_token(const float* x, int64_t n_in, int64_t n_out, const void* wt, int dtype,
                                        const float* bias, const float* w, int64_t keep, float* scores,
                                        float* work, int32_t* idx, float* coef, float* y, int threads, int simd) {
        simd = simd && sb_have_avx2();
        if (threads < 1) threads = 1;
        const int64_t k = sb_select(x, n_in, 0.0f, keep < 0 ? 0 : keep, w, scores, work, idx, coef);
        sb_linear_rows(n_out, wt, dtype, bias, idx, coef, k, y, threads, simd);
        return k;
    }

    /* Up to SB_MAX_GROUP input-sparse linears that read the same input x (q/k/v, gate/up), each
     * with its own selection (sb_select: thresholds[g], or the top keeps[g] by ws[g] when keeps[g] >= 0):
     * y_g = sum over its active j of x_j * wts[g][j] (+ biases[g]). One fork/join for the group;
     * thread t owns the same column slice of each member as sb_linear_token would give it, so every
     * output equals that call's bit for bit. idxs[g]/coefs[g] are scratch [n_in], scores/work scratch
     * [n_in] shared by the members; on return ks[g] channels are active, idxs[g][0:ks[g]]. */
    #define SB_MAX_GROUP 3
    static void sb_linear_group_token(const float* x, int64_t n_in, int G, const int64_t* n_outs,
                                      const void* const* wts, int dtype, const float* const* biases,
                                      const float* thresholds, const int64_t* keeps, const float* const* ws,
                                      float* scores, float* scratch, int32_t* const* idxs, float* const* coefs,
                                      int64_t* ks, float* const* ys, int threads, int simd) {
        int64_t work = 0;
        simd = simd && sb_have_avx2();
        if (threads < 1) threads = 1;
        for (int g = 0; g < G; g++) {
            ks[g] = sb_select(x, n_in, thresholds[g], keeps[g], ws[g], scores, scratch, idxs[g], coefs[g]);
            work += ks[g] * n_outs[g];
        }
        #pragma omp parallel num_threads(threads) if(threads > 1 && work >= SB_MIN_PARALLEL_WORK)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            for (int g = 0; g < G; g++) {
                int64_t c0, c1;
                sb_slice(n_outs[g], t, nt, &c0, &c1);
                if (c1 <= c0) continue;
                if (biases[g]) memcpy(ys[g] + c0, biases[g] + c0, (size_t)(c1 - c0) * sizeof(float));
                else memset(ys[g] + c0, 0, (size_t)(c1 - c0) * sizeof(float));
                sb_accumulate_rows(simd, ys[g], wts[g], dtype, n_outs[g], idxs[g], coefs[g], ks[g], c0, c1);
            }
        }
    }

    /* A whole MLP for one token whose linears' *inputs* are selected (TEAL, WINA): gate and up
     * read the channels of x that their selections keep (sel[0], sel[1]; sb_select), h = act(g + bg) *
     * up_act(u + bu) (plain MLPs: act(u + bu), no gate), down reads the channels of h that sel[2]
     * keeps. Weights are stored transposed (gate_t, up_t [H, I], down_t [I, H]), as the input-sparse
     * linear reads them. One fork/join: each thread owns a slice of g, u and h (the same slice the
     * linear kernel would give it, so g and u equal that kernel's bit for bit), one thread selects
     * down's channels of h, then each thread owns a slice of y. idxs/coefs[0..1] are scratch [H],
     * idxs/coefs[2] scratch [I]; g, u, h scratch [I]; scores/work scratch [max(H, I)]. On return
     * ks[m] channels of linear m are active, idxs[m][0:ks[m]]. */
    static void sb_mlp_inputs_token(const float* x, int64_t H, int64_t I, int dtype, int gated, const void* gate_t,
                                    const void* up_t, const void* down_t, const float* gate_bias,
                                    const float* up_bias, const float* down_bias, const float* thresholds,
                                    const int64_t* keeps, const float* const* ws, int act, float act_param,
                                    int up_act, int32_t* const* idxs, float* const* coefs, float* g, float* u,
                                    float* h, float* scores, float* work, int64_t* ks, float* y, int threads,
                                    int simd) {
        simd = simd && sb_have_avx2();
        if (threads < 1) threads = 1;
        ks[0] = gated ? sb_select(x, H, thresholds[0], keeps[0], ws[0], scores, work, idxs[0], coefs[0]) : 0;
        ks[1] = sb_select(x, H, thresholds[1], keeps[1], ws[1], scores, work, idxs[1], coefs[1]);
        int64_t kd = 0;
        /* down's work is not known before h: count it as dense */
        const int parallel = threads > 1 && (ks[0] + ks[1]) * I + I * H >= SB_MIN_PARALLEL_WORK;
        #pragma omp parallel num_threads(threads) if(parallel)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t c0, c1;
            sb_slice(I, t, nt, &c0, &c1);
            if (c1 > c0) {
                const size_t bytes = (size_t)(c1 - c0) * sizeof(float);
                if (up_bias) memcpy(u + c0, up_bias + c0, bytes);
                else memset(u + c0, 0, bytes);
                sb_accumulate_rows(simd, u, up_t, dtype, I, idxs[1], coefs[1], ks[1], c0, c1);
                if (gated) {
                    if (gate_bias) memcpy(g + c0, gate_bias + c0, bytes);
                    else memset(g + c0, 0, bytes);
                    sb_accumulate_rows(simd, g, gate_t, dtype, I, idxs[0], coefs[0], ks[0], c0, c1);
                    for (int64_t j = c0; j < c1; j++) h[j] = sb_act(act, g[j], act_param) * sb_act(up_act, u[j], 0.0f);
                } else {
                    for (int64_t j = c0; j < c1; j++) h[j] = sb_act(act, u[j], act_param);
                }
            }
            #pragma omp barrier
            #pragma omp single
            kd = sb_select(h, I, thresholds[2], keeps[2], ws[2], scores, work, idxs[2], coefs[2]);
            /* implicit barrier: down's channels are chosen */
            sb_slice(H, t, nt, &c0, &c1);
            if (c1 > c0) {
                if (down_bias) memcpy(y + c0, down_bias + c0, (size_t)(c1 - c0) * sizeof(float));
                else memset(y + c0, 0, (size_t)(c1 - c0) * sizeof(float));
                sb_accumulate_rows(simd, y, down_t, dtype, H, idxs[2], coefs[2], kd, c0, c1);
            }
        }
        ks[2] = kd;
    }    """
    int64_t sb_mlp_token(const float* x, int64_t H, int64_t I, const void* gate, const void* up,
                         const void* down_t, int dtype, const float* gate_bias, const float* up_bias,
                         const float* down_bias, int gated, int mode, const float* given, const uint8_t* mask,
                         int rule, float threshold, const float* thresholds, int act, float act_param,
                         int up_act, int32_t* idx, float* h, float* act_all, float* y, int threads, int simd)
    int64_t sb_linear_topk_token(const float* x, int64_t n_in, int64_t n_out, const void* wt, int dtype,
                                 const float* bias, const float* w, int64_t keep, float* scores,
                                 float* work, int32_t* idx, float* coef, float* y, int threads, int simd)
    int64_t sb_linear_token(const float* x, int64_t n_in, int64_t n_out, const void* wt, int dtype,
                            const float* bias, const uint8_t* mask, int use_threshold, float threshold,
                            int32_t* idx, float* coef, float* y, int threads, int simd)
    void sb_linear_group_token(const float* x, int64_t n_in, int G, const int64_t* n_outs,
                               const void* const* wts, int dtype, const float* const* biases,
                               const float* thresholds, const int64_t* keeps, const float* const* ws,
                               float* scores, float* scratch, int32_t* const* idxs, float* const* coefs,
                               int64_t* ks, float* const* ys, int threads, int simd)
    void sb_mlp_inputs_token(const float* x, int64_t H, int64_t I, int dtype, int gated, const void* gate_t,
                             const void* up_t, const void* down_t, const float* gate_bias,
                             const float* up_bias, const float* down_bias, const float* thresholds,
                             const int64_t* keeps, const float* const* ws, int act, float act_param,
                             int up_act, int32_t* const* idxs, float* const* coefs, float* g, float* u,
                             float* h, float* scores, float* work, int64_t* ks, float* y, int threads,
                             int simd)
    int sb_have_avx2()

DTYPE_F32 = 0
DTYPE_BF16 = 1
FROM_X = 0
GIVEN_ACT = 1
GIVEN_H = 2
RULE_ACT = 1  # |act(gate x)| > threshold (CATS)
RULE_H = 2  # |h_j| >= thresholds[j] (CETT)
ACTIVATIONS = {"identity": 0, "silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4, "fatrelu": 5}


def have_avx2():
    """Whether this CPU runs the AVX2/FMA loops (otherwise the portable ones run)."""
    return bool(sb_have_avx2())


def mlp_token(int64_t x, int64_t hidden, int64_t inter, int64_t gate, int64_t up, int64_t down_t, int dtype,
              int64_t gate_bias, int64_t up_bias, int64_t down_bias, int gated, int mode, int64_t given,
              int64_t mask, int rule, float threshold, int64_t thresholds, int act, float act_param, int up_act,
              int64_t idx, int64_t h, int64_t act_all, int64_t y, int threads, int simd):
    """One MLP call for one token (see ``sb_mlp_token``; ``rule``: 0, RULE_ACT or RULE_H); returns
    the number of active neurons."""
    cdef int64_t k
    with nogil:
        k = sb_mlp_token(<const float*> <uintptr_t> x, hidden, inter, <const void*> <uintptr_t> gate,
                         <const void*> <uintptr_t> up, <const void*> <uintptr_t> down_t, dtype,
                         <const float*> <uintptr_t> gate_bias, <const float*> <uintptr_t> up_bias,
                         <const float*> <uintptr_t> down_bias, gated, mode, <const float*> <uintptr_t> given,
                         <const uint8_t*> <uintptr_t> mask, rule, threshold,
                         <const float*> <uintptr_t> thresholds, act, act_param, up_act,
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


def linear_topk_token(int64_t x, int64_t n_in, int64_t n_out, int64_t wt, int dtype, int64_t bias, int64_t w,
                      int64_t keep, int64_t scores, int64_t work, int64_t idx, int64_t coef, int64_t y, int threads,
                      int simd):
    """One input-sparse linear keeping the ``keep`` largest |x_j|·w_j (see ``sb_linear_topk_token``);
    returns the active channels."""
    cdef int64_t k
    with nogil:
        k = sb_linear_topk_token(<const float*> <uintptr_t> x, n_in, n_out, <const void*> <uintptr_t> wt, dtype,
                                 <const float*> <uintptr_t> bias, <const float*> <uintptr_t> w, keep,
                                 <float*> <uintptr_t> scores, <float*> <uintptr_t> work, <int32_t*> <uintptr_t> idx,
                                 <float*> <uintptr_t> coef, <float*> <uintptr_t> y, threads, simd)
    return k


def linear_group_token(int64_t x, int64_t n_in, int dtype, tuple members, tuple selections, tuple ys,
                       int64_t scores, int64_t work, int threads, int simd):
    """Input-sparse linears sharing one input ``x`` in one call (see ``sb_linear_group_token``):
    ``members`` holds, per linear (at most 3), ``(wt, n_out, bias, idx, coef)`` with pointers as
    integers (fixed per layer, so a caller keeps the tuple); ``selections`` and ``ys`` (output
    pointers) hold the per-call values in the same order: a selection is ``(threshold, keep, w)``,
    |x_j| > threshold when ``keep`` < 0, else the ``keep`` largest |x_j|·w_j (``w`` a pointer, 0:
    |x_j|). ``scores``/``work``: fp32 scratch [n_in]. Returns the active-channel count of each."""
    cdef int G = len(members)
    cdef int64_t n_outs[3]
    cdef const void* wts[3]
    cdef const float* biases[3]
    cdef float ts[3]
    cdef int64_t keeps[3]
    cdef const float* wvec[3]
    cdef int32_t* idxs[3]
    cdef float* coefs[3]
    cdef int64_t ks[3]
    cdef float* outs[3]
    cdef int g
    if G < 1 or G > 3 or len(selections) != G or len(ys) != G:
        raise ValueError(f"linear_group_token takes 1 to 3 linears with one selection and output each, not {G}")
    for g in range(G):
        wt, n_out, bias, idx, coef = members[g]
        wts[g] = <const void*> <uintptr_t> <int64_t> wt
        n_outs[g] = n_out
        biases[g] = <const float*> <uintptr_t> <int64_t> bias
        idxs[g] = <int32_t*> <uintptr_t> <int64_t> idx
        coefs[g] = <float*> <uintptr_t> <int64_t> coef
        t, keep, w = selections[g]
        ts[g] = t
        keeps[g] = keep
        wvec[g] = <const float*> <uintptr_t> <int64_t> w
        outs[g] = <float*> <uintptr_t> <int64_t> ys[g]
    with nogil:
        sb_linear_group_token(<const float*> <uintptr_t> x, n_in, G, n_outs, wts, dtype, biases, ts, keeps, wvec,
                              <float*> <uintptr_t> scores, <float*> <uintptr_t> work, idxs, coefs, ks, outs,
                              threads, simd)
    return tuple(ks[g] for g in range(G))


def mlp_inputs_token(int64_t x, int64_t hidden, int64_t inter, int dtype, int gated, tuple weights,
                     tuple selections, int act, float act_param, int up_act, tuple scratch, int64_t y, int threads,
                     int simd):
    """A whole MLP for one token with its linears' inputs selected (see ``sb_mlp_inputs_token``).
    ``weights``: ``(gate_t, up_t, down_t, gate_bias, up_bias, down_bias)`` pointers (0: none);
    ``selections``: per linear (gate, up, down) ``(threshold, keep, w)`` as in
    ``linear_group_token``, with ``keep`` < -1 for a dense linear; ``scratch``: ``(idx_gate,
    coef_gate, idx_up, coef_up, idx_down, coef_down, g, u, h, scores, work)`` pointers. Returns
    the active-channel count of gate, up and down."""
    cdef const float* ws[3]
    cdef float ts[3]
    cdef int64_t keeps[3]
    cdef int32_t* idxs[3]
    cdef float* coefs[3]
    cdef int64_t ks[3]
    cdef int m
    if len(weights) != 6 or len(selections) != 3 or len(scratch) != 11:
        raise ValueError("mlp_inputs_token takes 6 weight pointers, 3 selections and 11 scratch pointers")
    for m in range(3):
        t, keep, w = selections[m]
        ts[m] = t
        keeps[m] = keep
        ws[m] = <const float*> <uintptr_t> <int64_t> w
        idxs[m] = <int32_t*> <uintptr_t> <int64_t> scratch[2 * m]
        coefs[m] = <float*> <uintptr_t> <int64_t> scratch[2 * m + 1]
    cdef int64_t gate_t = weights[0], up_t = weights[1], down_t = weights[2]
    cdef int64_t gate_bias = weights[3], up_bias = weights[4], down_bias = weights[5]
    cdef int64_t g = scratch[6], u = scratch[7], h = scratch[8], scores = scratch[9], work = scratch[10]
    with nogil:
        sb_mlp_inputs_token(<const float*> <uintptr_t> x, hidden, inter, dtype, gated,
                            <const void*> <uintptr_t> gate_t, <const void*> <uintptr_t> up_t,
                            <const void*> <uintptr_t> down_t, <const float*> <uintptr_t> gate_bias,
                            <const float*> <uintptr_t> up_bias, <const float*> <uintptr_t> down_bias, ts, keeps,
                            ws, act, act_param, up_act, idxs, coefs, <float*> <uintptr_t> g, <float*> <uintptr_t> u,
                            <float*> <uintptr_t> h, <float*> <uintptr_t> scores, <float*> <uintptr_t> work, ks,
                            <float*> <uintptr_t> y, threads, simd)
    return ks[0], ks[1], ks[2]


# ---------------------------------------------------------------- call plans
# A decode step of a small model makes a few hundred kernel calls; in Python each call's
# argument handling and timing cost microseconds, a measurable share of the step. A call
# plan keeps a layer's fixed arguments (pointers, shapes, the selections of its rules) in C
# and times its kernel with the C clock, so a call passes only what changes per token.

cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double> ts.tv_sec + 1e-9 * <double> ts.tv_nsec


cdef class OutputSlot:
    """The output tensor of one call plan, handed out token after token: the same tensor again
    when nothing holds it any more — no reference to it but this slot's, and no view or other
    tensor on its storage (``use_count``, torch's count of the storage's holders) — a new one
    (``empty``, shape: ``ndim - 1`` ones, then ``n``) otherwise. A decode step consumes its
    projections' outputs within the step (rotary, the KV cache's copy, the residual add), so
    this saves an allocation per call, and an output someone kept is never written over."""
    cdef public object tensor
    cdef public int64_t ptr, made
    cdef int64_t n, ndim, storage, idle_uses
    cdef Py_ssize_t idle_refs
    cdef object empty, use_count

    def __init__(self, int64_t n, empty, use_count):
        self.n, self.ndim, self.empty, self.use_count = n, -1, empty, use_count
        self.tensor, self.ptr, self.made = None, 0, 0

    cpdef object take(self, int64_t ndim):
        t = self.tensor
        # held while idle: the slot and ``t``
        if (t is not None and self.ndim == ndim and Py_REFCNT(t) == self.idle_refs
                and self.use_count(self.storage) == self.idle_uses):
            return t
        t = self.empty((1,) * (ndim - 1) + (self.n,))
        self.tensor, self.ndim, self.ptr = t, ndim, t.data_ptr()
        self.made += 1
        self.storage = t.untyped_storage()._cdata
        self.idle_refs, self.idle_uses = Py_REFCNT(t), self.use_count(self.storage)
        return t


cdef class KernelClock:
    """Wall seconds and calls inside the kernels of the call plans that share it."""
    cdef public double seconds
    cdef public int64_t calls

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0


cdef class LinearCall:
    """One input-sparse linear's single-token call: ``wt`` [n_in, n_out] transposed weight,
    fp32 ``bias`` (0: none), kept-channel scratch ``idx``/``coef`` [n_in] and the top-k rule's
    ``scores``/``work`` [n_in] (pointers as integers, fixed per layer)."""
    cdef int64_t n_in, n_out, wt, bias, idx, coef, scores, work
    cdef int dtype
    cdef KernelClock clock
    cdef public OutputSlot slot  # the output of ``run_threshold`` / ``run_topk``

    def __init__(self, KernelClock clock, int64_t n_in, int64_t n_out, int64_t wt, int dtype, int64_t bias,
                 int64_t idx, int64_t coef, int64_t scores, int64_t work):
        self.clock, self.n_in, self.n_out, self.wt, self.dtype = clock, n_in, n_out, wt, dtype
        self.bias, self.idx, self.coef, self.scores, self.work = bias, idx, coef, scores, work

    def threshold(self, int64_t x, int64_t mask, int use_threshold, float threshold, int64_t y, int threads,
                  int simd):
        """As ``linear_token``: a given byte ``mask`` (0: none) or |x_j| > ``threshold``."""
        cdef int64_t k
        cdef double t0
        with nogil:
            t0 = _now()
            k = sb_linear_token(<const float*> <uintptr_t> x, self.n_in, self.n_out, <const void*> <uintptr_t> self.wt,
                                self.dtype, <const float*> <uintptr_t> self.bias, <const uint8_t*> <uintptr_t> mask,
                                use_threshold, threshold, <int32_t*> <uintptr_t> self.idx,
                                <float*> <uintptr_t> self.coef, <float*> <uintptr_t> y, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        return k

    def run_threshold(self, x, float threshold, int64_t ndim, int threads, int simd):
        """``threshold`` on a contiguous fp32 tensor ``x``, into an output from ``slot``
        (``ndim`` dimensions); returns the output and the kept count."""
        out = self.slot.take(ndim)
        k = self.threshold(x.data_ptr(), 0, 1, threshold, self.slot.ptr, threads, simd)
        return out, k

    def run_topk(self, x, int64_t w, int64_t keep, int64_t ndim, int threads, int simd):
        """``topk`` on a contiguous fp32 tensor ``x``, into an output from ``slot``."""
        out = self.slot.take(ndim)
        k = self.topk(x.data_ptr(), w, keep, self.slot.ptr, threads, simd)
        return out, k

    def topk(self, int64_t x, int64_t w, int64_t keep, int64_t y, int threads, int simd):
        """As ``linear_topk_token``: the ``keep`` largest |x_j|·w_j (``w`` 0: |x_j|)."""
        cdef int64_t k
        cdef double t0
        with nogil:
            t0 = _now()
            k = sb_linear_topk_token(<const float*> <uintptr_t> x, self.n_in, self.n_out,
                                     <const void*> <uintptr_t> self.wt, self.dtype,
                                     <const float*> <uintptr_t> self.bias, <const float*> <uintptr_t> w, keep,
                                     <float*> <uintptr_t> self.scores, <float*> <uintptr_t> self.work,
                                     <int32_t*> <uintptr_t> self.idx, <float*> <uintptr_t> self.coef,
                                     <float*> <uintptr_t> y, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        return k


cdef void _selections_into(tuple selections, int n, float* ts, int64_t* keeps, const float** ws) except *:
    cdef int m
    if len(selections) != n:
        raise ValueError(f"{n} selections expected, not {len(selections)}")
    for m in range(n):
        t, keep, w = selections[m]
        ts[m] = t
        keeps[m] = keep
        ws[m] = <const float*> <uintptr_t> <int64_t> w


cdef class _SelectingCall:
    """A call whose linears (at most 3) take the selections of their rules: per linear its
    kept-channel scratch and its selection, set with ``select`` whenever a rule changes."""
    cdef int n_select
    cdef int32_t* idxs[3]
    cdef float* coefs[3]
    cdef float ts[3]
    cdef int64_t keeps[3]
    cdef const float* ws[3]
    cdef KernelClock clock

    def select(self, tuple selections):
        _selections_into(selections, self.n_select, self.ts, self.keeps, self.ws)


cdef class GroupCall(_SelectingCall):
    """``linear_group_token`` for one layer's group (q/k/v or gate/up): ``members`` as there,
    fixed; the members' selections set with ``select``."""
    cdef int G, dtype
    cdef int64_t n_in, scores, work
    cdef int64_t n_outs[3]
    cdef const void* wts[3]
    cdef const float* biases[3]
    cdef public tuple slots  # an OutputSlot per member, for ``run``

    def __init__(self, KernelClock clock, int64_t n_in, int dtype, tuple members, int64_t scores, int64_t work):
        cdef int g
        self.G = self.n_select = len(members)
        if self.G < 1 or self.G > 3:
            raise ValueError(f"a group holds 1 to 3 linears, not {self.G}")
        self.clock, self.n_in, self.dtype, self.scores, self.work = clock, n_in, dtype, scores, work
        for g in range(self.G):
            wt, n_out, bias, idx, coef = members[g]
            self.wts[g] = <const void*> <uintptr_t> <int64_t> wt
            self.n_outs[g] = n_out
            self.biases[g] = <const float*> <uintptr_t> <int64_t> bias
            self.idxs[g] = <int32_t*> <uintptr_t> <int64_t> idx
            self.coefs[g] = <float*> <uintptr_t> <int64_t> coef
            self.ts[g], self.keeps[g], self.ws[g] = 0.0, -2, NULL  # dense until selected

    def __call__(self, int64_t x, int64_t y0, int64_t y1, int64_t y2, int threads, int simd):
        """The group on one token ``x``, outputs ``y0``.. (one per member); returns the
        active-channel count of each member."""
        cdef int64_t ks[3]
        cdef float* ys[3]
        cdef double t0
        ys[0], ys[1], ys[2] = <float*> <uintptr_t> y0, <float*> <uintptr_t> y1, <float*> <uintptr_t> y2
        with nogil:
            t0 = _now()
            sb_linear_group_token(<const float*> <uintptr_t> x, self.n_in, self.G, self.n_outs, self.wts, self.dtype,
                                  self.biases, self.ts, self.keeps, self.ws, <float*> <uintptr_t> self.scores,
                                  <float*> <uintptr_t> self.work, self.idxs, self.coefs, ks, ys, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        if self.G == 3:
            return ks[0], ks[1], ks[2]
        return tuple(ks[g] for g in range(self.G))

    def run(self, x, int64_t ndim, int threads, int simd):
        """The group on one token: ``x`` a contiguous fp32 tensor, the outputs taken from
        ``slots`` (``ndim`` dimensions); returns the outputs, then each member's kept count."""
        cdef int64_t ks[3]
        cdef float* ys[3]
        cdef double t0
        cdef int g
        cdef OutputSlot slot
        cdef const float* xp = <const float*> <uintptr_t> <int64_t> x.data_ptr()
        outs = []
        for g in range(self.G):
            slot = self.slots[g]
            outs.append(slot.take(ndim))
            ys[g] = <float*> <uintptr_t> slot.ptr
        with nogil:
            t0 = _now()
            sb_linear_group_token(xp, self.n_in, self.G, self.n_outs, self.wts, self.dtype, self.biases, self.ts,
                                  self.keeps, self.ws, <float*> <uintptr_t> self.scores, <float*> <uintptr_t> self.work,
                                  self.idxs, self.coefs, ks, ys, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        for g in range(self.G):
            outs.append(ks[g])
        return outs


cdef class MLPInputsCall(_SelectingCall):
    """``mlp_inputs_token`` for one layer: ``weights`` and ``scratch`` as there, fixed; the
    selections of gate, up and down set with ``select``."""
    cdef int64_t H, I, gate_t, up_t, down_t, gate_bias, up_bias, down_bias, g, u, h, scores, work
    cdef int dtype, gated, act, up_act
    cdef public OutputSlot slot  # the output of ``run``
    cdef float act_param

    def __init__(self, KernelClock clock, int64_t hidden, int64_t inter, int dtype, int gated, tuple weights,
                 int act, float act_param, int up_act, tuple scratch):
        cdef int m
        if len(weights) != 6 or len(scratch) != 11:
            raise ValueError("an MLP call takes 6 weight pointers and 11 scratch pointers")
        self.n_select = 3
        self.clock, self.H, self.I, self.dtype, self.gated = clock, hidden, inter, dtype, gated
        self.gate_t, self.up_t, self.down_t = weights[0], weights[1], weights[2]
        self.gate_bias, self.up_bias, self.down_bias = weights[3], weights[4], weights[5]
        self.act, self.act_param, self.up_act = act, act_param, up_act
        for m in range(3):
            self.idxs[m] = <int32_t*> <uintptr_t> <int64_t> scratch[2 * m]
            self.coefs[m] = <float*> <uintptr_t> <int64_t> scratch[2 * m + 1]
            self.ts[m], self.keeps[m], self.ws[m] = 0.0, -2, NULL
        self.g, self.u, self.h, self.scores, self.work = scratch[6], scratch[7], scratch[8], scratch[9], scratch[10]

    def __call__(self, int64_t x, int64_t y, int threads, int simd):
        """The MLP on one token ``x`` into ``y``; returns the kept channels of gate, up, down."""
        cdef int64_t ks[3]
        cdef double t0
        with nogil:
            t0 = _now()
            sb_mlp_inputs_token(<const float*> <uintptr_t> x, self.H, self.I, self.dtype, self.gated,
                                <const void*> <uintptr_t> self.gate_t, <const void*> <uintptr_t> self.up_t,
                                <const void*> <uintptr_t> self.down_t, <const float*> <uintptr_t> self.gate_bias,
                                <const float*> <uintptr_t> self.up_bias, <const float*> <uintptr_t> self.down_bias,
                                self.ts, self.keeps, self.ws, self.act, self.act_param, self.up_act, self.idxs,
                                self.coefs, <float*> <uintptr_t> self.g, <float*> <uintptr_t> self.u,
                                <float*> <uintptr_t> self.h, <float*> <uintptr_t> self.scores,
                                <float*> <uintptr_t> self.work, ks, <float*> <uintptr_t> y, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        return ks[0], ks[1], ks[2]

    def run(self, x, int64_t ndim, int threads, int simd):
        """The MLP on a contiguous fp32 tensor ``x`` into an output from ``slot`` (``ndim``
        dimensions); returns the output and the kept channels of gate, up, down."""
        out = self.slot.take(ndim)
        k_gate, k_up, k_down = self(x.data_ptr(), self.slot.ptr, threads, simd)
        return out, k_gate, k_up, k_down


cdef class MLPCall:
    """``mlp_token`` for one layer with its weights, activations and scratch fixed."""
    cdef int64_t H, I, gate, up, down_t, gate_bias, up_bias, down_bias, idx, h, act_all
    cdef int dtype, gated, act, up_act
    cdef float act_param
    cdef KernelClock clock

    def __init__(self, KernelClock clock, int64_t hidden, int64_t inter, int64_t gate, int64_t up, int64_t down_t,
                 int dtype, int64_t gate_bias, int64_t up_bias, int64_t down_bias, int gated, int act,
                 float act_param, int up_act, int64_t idx, int64_t h, int64_t act_all):
        self.clock, self.H, self.I, self.gate, self.up, self.down_t = clock, hidden, inter, gate, up, down_t
        self.dtype, self.gate_bias, self.up_bias, self.down_bias, self.gated = dtype, gate_bias, up_bias, down_bias, gated
        self.act, self.act_param, self.up_act, self.idx, self.h, self.act_all = act, act_param, up_act, idx, h, act_all

    def __call__(self, int64_t x, int mode, int64_t given, int64_t mask, int rule, float threshold,
                 int64_t thresholds, int64_t y, int threads, int simd):
        """As ``mlp_token`` on one token; returns the active neurons."""
        cdef int64_t k
        cdef double t0
        with nogil:
            t0 = _now()
            k = sb_mlp_token(<const float*> <uintptr_t> x, self.H, self.I, <const void*> <uintptr_t> self.gate,
                             <const void*> <uintptr_t> self.up, <const void*> <uintptr_t> self.down_t, self.dtype,
                             <const float*> <uintptr_t> self.gate_bias, <const float*> <uintptr_t> self.up_bias,
                             <const float*> <uintptr_t> self.down_bias, self.gated, mode,
                             <const float*> <uintptr_t> given, <const uint8_t*> <uintptr_t> mask, rule, threshold,
                             <const float*> <uintptr_t> thresholds, self.act, self.act_param, self.up_act,
                             <int32_t*> <uintptr_t> self.idx, <float*> <uintptr_t> self.h,
                             <float*> <uintptr_t> self.act_all, <float*> <uintptr_t> y, threads, simd)
            self.clock.seconds += _now() - t0
        self.clock.calls += 1
        return k
