/* leanmoe: the MoE's token-copy rows on CPUs in bf16, forward and backward, in one pass each.
 *
 * Training in bf16 on a CPU, leanmoe.model.moe.MoE lays each token's K copies out as rows of a
 * [P, D] matrix sorted by expert (each expert's rows padded to a multiple of 32; see
 * MoE.gather_rows). row[t * K + j] is the row of token t's j-th copy; padding rows belong to no copy.
 *
 *     gather:   xp[i, :]  = bf16(x[src[i], :])                        x fp32 or bf16 [N, D]
 *     sum:      out[t, :] = sum_j w[t, j] * y[row[t, j], :]            (w = 1 when none is given)
 *     combine backward, given g = d out [N, D]:
 *               dy[row[t, j], :] = bf16(w[t, j] * g[t, :]),  dy = 0 on padding rows
 *               dw[t, j]         = g[t, :] . y[row[t, j], :]
 *
 * `sum` is both the combine (weights given) and the gather's backward (no weights: each token's
 * gradient is the sum of its copies' gradients). Sums accumulate in fp32 and round once. Torch does
 * the same with index_select, a cast, a [N, K, D] product and its sum, and index_add/scatter_add in the
 * backward: several passes over [P, D] and [N, K, D] buffers where these make one.
 *
 * Built by leanmoe/kernels/cpu_kernels.py; leanmoe/kernels/moe_rows.py holds the torch references and
 * tests/kernels/test_moe_rows.py holds the two equal.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

/* x [N, D] (fp32, or bf16 when x_bf16), src [P] rows of x -> xp [P, D] bf16. -2 on a bad index. */
int leanmoe_gather_rows_bf16(const void *x, int x_bf16, const int64_t *src, int64_t n, int64_t p, int d,
                             uint16_t *xp, int n_threads) {
    for (int64_t i = 0; i < p; i++)
        if (src[i] < 0 || src[i] >= n) return -2;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < p; i++) {
        uint16_t *o = xp + i * d;
        if (x_bf16) {
            memcpy(o, (const uint16_t *)x + src[i] * d, (size_t)d * sizeof(uint16_t));
        } else {
            const float *xi = (const float *)x + src[i] * d;
#pragma omp simd
            for (int c = 0; c < d; c++) o[c] = f32_to_bf16(xi[c]);
        }
    }
    return 0;
}

/* y [P, D] bf16, row [N * K] (each < P), w [N, K] fp32 or NULL -> out [N, D], fp32 when out_f32
 * else bf16. -2 on a bad row. */
int leanmoe_sum_rows_bf16(const uint16_t *y, const int64_t *row, const float *w, int64_t n, int k, int d, int64_t p,
                          void *out, int out_f32, int n_threads) {
    for (int64_t i = 0; i < n * k; i++)
        if (row[i] < 0 || row[i] >= p) return -2;
#pragma omp parallel num_threads(n_threads)
    {
        float acc[d]; /* d is a hidden size: a few KB of stack */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) {
            for (int c = 0; c < d; c++) acc[c] = 0.f;
            for (int j = 0; j < k; j++) {
                const uint16_t *yr = y + row[t * k + j] * d;
                const float wj = w ? w[t * k + j] : 1.f;
#pragma omp simd
                for (int c = 0; c < d; c++) acc[c] += wj * bf16_to_f32(yr[c]);
            }
            if (out_f32) {
                memcpy((float *)out + t * d, acc, (size_t)d * sizeof(float));
            } else {
                uint16_t *o = (uint16_t *)out + t * d;
#pragma omp simd
                for (int c = 0; c < d; c++) o[c] = f32_to_bf16(acc[c]);
            }
        }
    }
    return 0;
}

/* The combine's backward. g [N, D] bf16, y [P, D] bf16, row [N * K] (distinct, each < P), w [N, K]
 * fp32 -> dy [P, D] bf16 (zero on rows no copy uses), dw [N, K] fp32. -2 on a bad or repeated row,
 * -3 when out of memory. */
int leanmoe_combine_backward_bf16(const uint16_t *g, const uint16_t *y, const int64_t *row, const float *w, int64_t n,
                                  int k, int d, int64_t p, uint16_t *dy, float *dw, int n_threads) {
    unsigned char *used = calloc((size_t)(p > 0 ? p : 1), 1);
    if (!used) return -3;
    for (int64_t i = 0; i < n * k; i++) {
        if (row[i] < 0 || row[i] >= p || used[row[i]]) {
            free(used);
            return -2;
        }
        used[row[i]] = 1;
    }
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < p; i++)
            if (!used[i]) memset(dy + i * d, 0, (size_t)d * sizeof(uint16_t));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *gt = g + t * d;
            for (int j = 0; j < k; j++) {
                const int64_t r = row[t * k + j];
                const uint16_t *yr = y + r * d;
                uint16_t *dyr = dy + r * d;
                const float wj = w[t * k + j];
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int c = 0; c < d; c++) {
                    const float gc = bf16_to_f32(gt[c]);
                    dot += gc * bf16_to_f32(yr[c]);
                    dyr[c] = f32_to_bf16(wj * gc);
                }
                dw[t * k + j] = dot;
            }
        }
    }
    free(used);
    return 0;
}
