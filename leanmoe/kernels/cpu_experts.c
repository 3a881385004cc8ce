/* leanmoe: the routed experts' SwiGLU MLP for bf16 training on CPUs with AVX512-BF16, forward and
 * backward, every expert's GEMMs in one parallel pass.
 *
 * Shape legend: P rows (token copies sorted by expert), E experts, D hidden, F expert width, both
 * multiples of 16. offs [E] holds each expert's inclusive row end.
 *
 *     forward:  h = x W1^T            [P, 2F]  (gate columns, then up)      saved for the backward
 *               a = silu(g) * u       [P, F]
 *               y = a W2^T            [P, D]
 *     backward, given dy [P, D]:
 *               da = dy W2;  dg = da * u * s * (1 + g (1 - s)),  du = da * silu(g)   (s = sigmoid(g))
 *               dx = dh W1            [P, D]
 *               dW2 = dy^T a          [E, D, F]  fp32
 *               dW1 = dh^T x          [E, 2F, D] fp32
 *
 * x, h, y, dy, dx are bf16; the weights W1 [E, 2F, D] and W2 [E, D, F] are the fp32 parameters,
 * rounded to bf16 (to nearest even, as torch's cast) while they are packed. Products accumulate in
 * fp32 (vdpbf16ps: a pair of bf16 products per lane), then round once.
 *
 * Why: torch's CPU path runs each expert's GEMM as its own oneDNN call (torch._grouped_mm loops
 * over the groups). At the `tiny` preset's shapes (32 experts of ~530 rows, D 256, F 64) those calls
 * are too small to use both cores well. Here the work is split into (expert, row block) tasks for
 * the row GEMMs and per-expert tasks for the weight gradients, shared by all threads.
 *
 * The GEMMs take their B operand "packed": pairs of consecutive contraction rows interleaved, one
 * uint32 (two bf16) per (pair, column), so one vdpbf16ps multiplies a broadcast pair of A by 16
 * columns. Built by leanmoe/kernels/cpu_kernels.py and called by leanmoe/kernels/experts_bf16.py;
 * tests/kernels/test_experts_bf16.py holds it equal to the grouped GEMMs it replaces
 * (leanmoe.kernels.grouped_gemm.expert_mlp_reference).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LEANMOE_BF16_DOT 1
#endif

/* 1 when this build has the kernels (the CPU and compiler support AVX512-BF16), else 0 */
int leanmoe_experts_bf16_available(void) {
#ifdef LEANMOE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

#ifdef LEANMOE_BF16_DOT

static inline uint32_t pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

/* 16 bf16 -> fp32 */
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* fp32 -> 16 bf16, rounded to nearest even */
static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* e^x (Cephes' expf polynomial on x - n ln 2, then scaled by 2^n); inputs clamped to [-88, 88] */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(q, n);
}

/* sigmoid(g) */
static inline __m512 sigmoid16(__m512 g) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

/* ------------------------------------------------------------------------------------- the GEMM */
#define MR 4 /* rows per micro tile */
#define NV 4 /* 16-column vectors per micro tile */

/* C[mr, nv*16] = sum_k A[r*lda + k] . B[k*ldb + n] over kp pairs; C fp32 (out_bf16 0) or bf16 */
static inline __attribute__((always_inline)) void micro(const int mr, const int nv, int64_t kp,
                                                        const uint32_t *restrict a, int64_t lda,
                                                        const uint32_t *restrict b, int64_t ldb,
                                                        void *restrict c, int64_t ldc, int out_bf16) {
    __m512 acc[MR][NV];
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kp; k++) {
        __m512bh bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            if (v < nv) bv[v] = (__m512bh)_mm512_loadu_si512((const void *)(b + k * ldb + v * 16));
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * lda + k]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++)
                    if (v < nv) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            if (r < mr && v < nv) {
                if (out_bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)c + r * ldc + v * 16),
                                        (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
                else
                    _mm512_storeu_ps((float *)c + r * ldc + v * 16, acc[r][v]);
            }
        }
    }
}

#define MICRO(R, V) micro(R, V, kp, a + r0 * lda, lda, b + n0, ldb, \
                          out_bf16 ? (void *)((uint16_t *)c + r0 * ldc + n0) : (void *)((float *)c + r0 * ldc + n0), \
                          ldc, out_bf16)

/* C[m, n] = A[m, kp pairs] B[kp pairs, n] (B packed, n a multiple of 16); one thread */
static void gemm(int64_t m, int64_t n, int64_t kp, const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb,
                 void *c, int64_t ldc, int out_bf16) {
    for (int64_t n0 = 0; n0 < n; n0 += 16 * NV) {
        int nv = (int)((n - n0) / 16 < NV ? (n - n0) / 16 : NV);
        for (int64_t r0 = 0; r0 < m; r0 += MR) {
            int mr = (int)(m - r0 < MR ? m - r0 : MR);
            if (nv == 4) {
                switch (mr) {
                case 4: MICRO(4, 4); break;
                case 3: MICRO(3, 4); break;
                case 2: MICRO(2, 4); break;
                default: MICRO(1, 4); break;
                }
            } else {
                switch (mr * 4 + nv) {
                case 4 * 4 + 3: MICRO(4, 3); break;
                case 4 * 4 + 2: MICRO(4, 2); break;
                case 4 * 4 + 1: MICRO(4, 1); break;
                case 3 * 4 + 3: MICRO(3, 3); break;
                case 3 * 4 + 2: MICRO(3, 2); break;
                case 3 * 4 + 1: MICRO(3, 1); break;
                case 2 * 4 + 3: MICRO(2, 3); break;
                case 2 * 4 + 2: MICRO(2, 2); break;
                case 2 * 4 + 1: MICRO(2, 1); break;
                case 1 * 4 + 3: MICRO(1, 3); break;
                case 1 * 4 + 2: MICRO(1, 2); break;
                default: MICRO(1, 1); break;
                }
            }
        }
    }
}

/* ----------------------------------------------------------------------------------- packing */
/* Weights into the packed B layout dst [kp, n] (pairs of contraction rows, rounded to bf16):
 *   pack_t: the contraction runs along src's rows: src [n, 2kp] (row stride ld)   dst[j, c] = (src[c, 2j], src[c, 2j+1])
 *   pack_n: the contraction runs down src's columns: src [2kp, n] (row stride ld) dst[j, c] = (src[2j, c], src[2j+1, c])
 * n is a multiple of 16. */
static void pack_t(const float *src, int64_t ld, int64_t kp, int64_t n, uint32_t *dst) {
    const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32((int)n));
    for (int64_t c = 0; c < n; c++) {
        const float *row = src + c * ld;
        for (int64_t j = 0; j < kp; j += 16) {
            /* 16 pairs: floats 2j .. 2j + 31 of the row, rounded in order, to 16 column entries */
            __mmask16 lo = (__mmask16)(kp - j >= 8 ? 0xffff : (1u << (2 * (kp - j))) - 1);
            __mmask16 hi = (__mmask16)(kp - j >= 16 ? 0xffff : kp - j > 8 ? (1u << (2 * (kp - j - 8))) - 1 : 0);
            __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + 2 * j + 16),
                                                         _mm512_maskz_loadu_ps(lo, row + 2 * j));
            __mmask16 keep = (__mmask16)(kp - j >= 16 ? 0xffff : (1u << (kp - j)) - 1);
            _mm512_mask_i32scatter_epi32(dst + j * n + c, keep, lanes, pairs, 4);
        }
    }
}

static void pack_n(const float *src, int64_t ld, int64_t kp, int64_t n, uint32_t *dst) {
    for (int64_t j = 0; j < kp; j++) {
        const float *r0 = src + 2 * j * ld, *r1 = r0 + ld;
        for (int64_t c = 0; c < n; c += 16) {
            __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_loadu_ps(r0 + c)));
            __m512i hi = _mm512_cvtepu16_epi32(to_bf16(_mm512_loadu_ps(r1 + c)));
            _mm512_storeu_si512((void *)(dst + j * n + c), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* bf16 rows [rows, n] (row stride sk, columns contiguous) as pairs of rows into dst [(rows + 1) / 2, n];
 * an odd last row is paired with zeros */
static void pack_rows_bf16(const uint16_t *src, int64_t sk, int64_t rows, int64_t n, uint32_t *dst) {
    for (int64_t j = 0; 2 * j < rows; j++) {
        const uint16_t *lo = src + 2 * j * sk, *hi = lo + sk;
        uint32_t *o = dst + j * n;
        if (2 * j + 1 < rows) {
#pragma omp simd
            for (int64_t c = 0; c < n; c++) o[c] = pair(lo[c], hi[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < n; c++) o[c] = lo[c];
        }
    }
}

static int check_offs(const int32_t *offs, int e, int64_t p) {
    int64_t prev = 0;
    for (int i = 0; i < e; i++) {
        if (offs[i] < prev) return -2;
        prev = offs[i];
    }
    return prev == p ? 0 : -2;
}

/* Scratch memory kept per thread between calls, grown when a call needs more (never shrunk; a thread's
 * buffers live as long as the thread). Fresh malloc'd blocks of a few MB come from mmap unless the
 * process keeps its heap (leanmoe.train.memory.retain_cpu_heap), and faulting their pages in took
 * longer than the weight packing itself (16 ms a forward against 0.7 with the heap kept). Each buffer
 * of one call has its own slot. */
enum { S_W1P, S_W2P, S_TASKS, S_AT, S_DHT, S_PAIRS, S_ROW_A, S_ROW_DH, S_XP, S_C2, N_SLOTS };

static void *scratch(int slot, size_t bytes) {
    static _Thread_local void *buf[N_SLOTS];
    static _Thread_local size_t cap[N_SLOTS];
    if (bytes > cap[slot]) {
        free(buf[slot]);
        buf[slot] = malloc(bytes);
        cap[slot] = buf[slot] ? bytes : 0;
    }
    return buf[slot];
}

#define ROW_BLOCK 64

/* tasks: (expert, first row, rows) with rows <= ROW_BLOCK, over every expert's rows */
static int64_t row_tasks(const int32_t *offs, int e, int64_t **out) {
    int64_t n = 0, start = 0;
    for (int i = 0; i < e; i++) {
        n += (offs[i] - start + ROW_BLOCK - 1) / ROW_BLOCK;
        start = offs[i];
    }
    int64_t *t = scratch(S_TASKS, sizeof(int64_t) * 3 * (n ? n : 1));
    if (!t) return -1;
    start = 0;
    int64_t k = 0;
    for (int i = 0; i < e; i++) {
        for (int64_t r = start; r < offs[i]; r += ROW_BLOCK) {
            t[3 * k] = i;
            t[3 * k + 1] = r;
            t[3 * k + 2] = offs[i] - r < ROW_BLOCK ? offs[i] - r : ROW_BLOCK;
            k++;
        }
        start = offs[i];
    }
    *out = t;
    return n;
}

#endif /* LEANMOE_BF16_DOT */

/* Returns 0; -1 when memory could not be allocated; -2 when offs is not nondecreasing row ends
 * ending at p; -3 when this build lacks AVX512-BF16 (see leanmoe_experts_bf16_available); -4 when D
 * or F is not a positive multiple of 16. */
int leanmoe_experts_bf16_forward(const uint16_t *x, const int32_t *offs, int e, int64_t p, int d, int f,
                                 const float *w1, const float *w2, uint16_t *h, uint16_t *y, int n_threads) {
#ifndef LEANMOE_BF16_DOT
    (void)x; (void)offs; (void)e; (void)p; (void)d; (void)f; (void)w1; (void)w2; (void)h; (void)y; (void)n_threads;
    return -3;
#else
    if (d <= 0 || f <= 0 || d % 16 || f % 16) return -4;
    if (check_offs(offs, e, p)) return -2;
    const int64_t f2 = 2 * (int64_t)f;
    /* W1 [2F, D] -> [D/2 pairs, 2F]; W2 [D, F] -> [F/2 pairs, D] */
    uint32_t *w1p = scratch(S_W1P, sizeof(uint32_t) * (size_t)e * (d / 2) * f2);
    uint32_t *w2p = scratch(S_W2P, sizeof(uint32_t) * (size_t)e * (f / 2) * d);
    int64_t *tasks = NULL;
    int64_t n_tasks = row_tasks(offs, e, &tasks);
    int failed = !w1p || !w2p || n_tasks < 0;
    if (!failed) {
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
        {
#pragma omp for schedule(static)
            for (int i = 0; i < e; i++) {
                pack_t(w1 + (int64_t)i * f2 * d, d, d / 2, f2, w1p + (int64_t)i * (d / 2) * f2);
                pack_t(w2 + (int64_t)i * d * f, f, f / 2, d, w2p + (int64_t)i * (f / 2) * d);
            }
            uint16_t *a = scratch(S_ROW_A, sizeof(uint16_t) * ROW_BLOCK * f);
            if (!a) failed = 1;
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_tasks; t++) {
                if (!a) continue;
                int64_t ex = tasks[3 * t], r0 = tasks[3 * t + 1], m = tasks[3 * t + 2];
                uint16_t *ht = h + r0 * f2;
                gemm(m, f2, d / 2, (const uint32_t *)(x + r0 * d), d / 2, w1p + ex * (d / 2) * f2, f2, ht, f2, 1);
                for (int64_t r = 0; r < m; r++) {
                    const uint16_t *hr = ht + r * f2;
                    for (int c = 0; c < f; c += 16) {
                        __m512 g = load_bf16(hr + c), u = load_bf16(hr + f + c);
                        _mm256_storeu_si256((__m256i *)(a + r * f + c), to_bf16(_mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u)));
                    }
                }
                gemm(m, d, f / 2, (const uint32_t *)a, f / 2, w2p + ex * (f / 2) * d, d, y + r0 * d, d, 1);
            }
        }
    }
    return failed ? -1 : 0;
#endif
}

/* Given dy [P, D] bf16 and the forward's x, h: dx [P, D] bf16 (skipped when dx is NULL), dw1
 * [E, 2F, D] and dw2 [E, D, F] fp32 (overwritten). Returns as the forward. */
int leanmoe_experts_bf16_backward(const uint16_t *x, const int32_t *offs, int e, int64_t p, int d, int f,
                                  const float *w1, const float *w2, const uint16_t *h, const uint16_t *dy,
                                  uint16_t *dx, float *dw1, float *dw2, int n_threads) {
#ifndef LEANMOE_BF16_DOT
    (void)x; (void)offs; (void)e; (void)p; (void)d; (void)f; (void)w1; (void)w2; (void)h; (void)dy; (void)dx;
    (void)dw1; (void)dw2; (void)n_threads;
    return -3;
#else
    if (d <= 0 || f <= 0 || d % 16 || f % 16) return -4;
    if (check_offs(offs, e, p)) return -2;
    const int64_t f2 = 2 * (int64_t)f;
    /* for da = dy W2: W2 [D, F] -> [D/2 pairs, F]; for dx = dh W1: W1 [2F, D] -> [F pairs, D] */
    uint32_t *w2p = scratch(S_W2P, sizeof(uint32_t) * (size_t)e * (d / 2) * f);
    uint32_t *w1p = dx ? scratch(S_W1P, sizeof(uint32_t) * (size_t)e * f * d) : NULL;
    /* per expert, for the weight gradients: a^T and dh^T as pairs of rows: [F, rows/2], [2F, rows/2] */
    int64_t *pairs_start = scratch(S_PAIRS, sizeof(int64_t) * (e + 1)); /* each expert's first pair of rows */
    if (pairs_start) {
        pairs_start[0] = 0;
        for (int i = 0; i < e; i++) pairs_start[i + 1] = pairs_start[i] + (offs[i] - (i ? offs[i - 1] : 0) + 1) / 2;
    }
    int64_t n_pairs = pairs_start ? pairs_start[e] : 0;
    uint32_t *at = scratch(S_AT, sizeof(uint32_t) * (size_t)(n_pairs ? n_pairs : 1) * f);
    uint32_t *dht = scratch(S_DHT, sizeof(uint32_t) * (size_t)(n_pairs ? n_pairs : 1) * f2);
    int64_t *tasks = NULL, max_rows = 0;
    int64_t n_tasks = row_tasks(offs, e, &tasks);
    for (int i = 0; i < e; i++) {
        int64_t rows = offs[i] - (i ? offs[i - 1] : 0);
        max_rows = rows > max_rows ? rows : max_rows;
    }
    int failed = !pairs_start || !w2p || (dx && !w1p) || !at || !dht || n_tasks < 0;
    if (!failed) {
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
        {
#pragma omp for schedule(static)
            for (int i = 0; i < e; i++) {
                pack_n(w2 + (int64_t)i * d * f, f, d / 2, f, w2p + (int64_t)i * (d / 2) * f);
                if (dx) pack_n(w1 + (int64_t)i * f2 * d, d, f, d, w1p + (int64_t)i * f * d);
            }
            float *da = scratch(S_ROW_A, sizeof(float) * ROW_BLOCK * f);
            uint16_t *dh = scratch(S_ROW_DH, sizeof(uint16_t) * ROW_BLOCK * f2);
            uint32_t *xp = scratch(S_XP, sizeof(uint32_t) * (size_t)((max_rows + 1) / 2 > 0 ? (max_rows + 1) / 2 : 1) * d);
            float *c2 = scratch(S_C2, sizeof(float) * f * d);
            if (!da || !dh || !c2 || !xp) failed = 1;
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_tasks; t++) {
                if (!da || !dh || !c2) continue;
                int64_t ex = tasks[3 * t], r0 = tasks[3 * t + 1], m = tasks[3 * t + 2];
                int64_t start = ex ? offs[ex - 1] : 0, half = pairs_start[ex + 1] - pairs_start[ex], j0 = (r0 - start) / 2;
                gemm(m, f, d / 2, (const uint32_t *)(dy + r0 * d), d / 2, w2p + ex * (d / 2) * f, f, da, f, 0);
                uint32_t *at_e = at + pairs_start[ex] * f, *dht_e = dht + pairs_start[ex] * f2;
                /* the pairs of rows (r, r + 1) are pair j0 + r / 2 of the expert's transposed a and dh */
                __m512i lane_c = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                    _mm512_set1_epi32((int)half));
                for (int64_t r = 0; r < m; r += 2) {
                    for (int c = 0; c < f; c += 16) {
                        __m512i an[2], dg[2], du[2];
                        an[1] = dg[1] = du[1] = _mm512_setzero_si512(); /* an odd last row's partner */
                        for (int q = 0; q < 2 && r + q < m; q++) {
                            const uint16_t *hr = h + (r0 + r + q) * f2;
                            __m512 g = load_bf16(hr + c), u = load_bf16(hr + f + c), sg = sigmoid16(g);
                            __m512 silu = _mm512_mul_ps(g, sg), dav = _mm512_loadu_ps(da + (r + q) * f + c);
                            /* d silu / dg = s (1 + g (1 - s)) */
                            __m512 ds = _mm512_mul_ps(sg, _mm512_fmadd_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.0f), sg),
                                                                            _mm512_set1_ps(1.0f)));
                            __m256i an16 = to_bf16(_mm512_mul_ps(silu, u));
                            __m256i du16 = to_bf16(_mm512_mul_ps(dav, silu));
                            __m256i dg16 = to_bf16(_mm512_mul_ps(_mm512_mul_ps(dav, u), ds));
                            _mm256_storeu_si256((__m256i *)(dh + (r + q) * f2 + c), dg16);
                            _mm256_storeu_si256((__m256i *)(dh + (r + q) * f2 + f + c), du16);
                            an[q] = _mm512_cvtepu16_epi32(an16);
                            dg[q] = _mm512_cvtepu16_epi32(dg16);
                            du[q] = _mm512_cvtepu16_epi32(du16);
                        }
                        int64_t j = j0 + r / 2;
                        _mm512_i32scatter_epi32(at_e + c * half + j, lane_c,
                                                _mm512_or_si512(an[0], _mm512_slli_epi32(an[1], 16)), 4);
                        _mm512_i32scatter_epi32(dht_e + c * half + j, lane_c,
                                                _mm512_or_si512(dg[0], _mm512_slli_epi32(dg[1], 16)), 4);
                        _mm512_i32scatter_epi32(dht_e + (f + c) * half + j, lane_c,
                                                _mm512_or_si512(du[0], _mm512_slli_epi32(du[1], 16)), 4);
                    }
                }
                if (dx) gemm(m, d, f, (const uint32_t *)dh, f, w1p + ex * f * d, d, dx + r0 * d, d, 1);
            }
            /* the weight gradients, one expert per task: dW2^T = a^T dy [F, D]; dW1 = dh^T x [2F, D] */
#pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < e; i++) {
                if (!c2 || !xp) continue;
                int64_t start = i ? offs[i - 1] : 0, rows = offs[i] - start, half = pairs_start[i + 1] - pairs_start[i];
                float *g1 = dw1 + (int64_t)i * f2 * d, *g2 = dw2 + (int64_t)i * d * f;
                if (half == 0) {
                    memset(g1, 0, sizeof(float) * f2 * d);
                    memset(g2, 0, sizeof(float) * d * f);
                    continue;
                }
                pack_rows_bf16(dy + start * d, d, rows, d, xp);
                gemm(f, d, half, at + pairs_start[i] * f, half, xp, d, c2, d, 0);
                for (int c = 0; c < f; c++)
                    for (int r = 0; r < d; r++) g2[(int64_t)r * f + c] = c2[(int64_t)c * d + r];
                pack_rows_bf16(x + start * d, d, rows, d, xp);
                gemm(f2, d, half, dht + pairs_start[i] * f2, half, xp, d, g1, d, 0);
            }
        }
    }
    return failed ? -1 : 0;
#endif
}
