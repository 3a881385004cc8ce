/* leanmoe: the routed experts' SwiGLU MLP for a few token copies per expert, fp32, on CPUs.
 *
 * Token copies arrive sorted by expert: rows offs[e-1] .. offs[e]-1 of x [M, D] go to expert e, whose
 * weights are w1[e] [2F, D] (F gate rows, then F up rows) and w2[e] [D, F], as leanmoe.model.moe.Experts
 * stores them. For each row r of expert e:
 *
 *     h[r] = silu(w1[e, :F] x[r]) * (w1[e, F:] x[r])      [F]
 *     y[r] = w2[e] h[r]                                   [D]
 *
 * At decode sizes (a handful of rows per expert) a BLAS GEMM per expert spends its time packing the
 * weight matrix, not multiplying. Here each weight row is read once, from where it lies, and dotted
 * with all of the expert's rows (four at a time, while it is in L1): the whole call reads every used
 * expert's weights once, which is the least any method can read. Work is split over (expert, a chunk of
 * output columns) in two parallel loops, gate/up then down, with h in between.
 *
 * Built by leanmoe/kernels/cpu_kernels.py; the torch reference is grouped_mm + silu + grouped_mm
 * (leanmoe.kernels.grouped_gemm.expert_mlp_reference), and tests/kernels hold the two equal.
 */
#include <math.h>
#include <stdint.h>

#define COLS 16 /* output columns per work item */

/* out[i * ldo] = w . x[i * ldx] for i < n rows, over k values (w read once per four rows) */
static void dot_rows(const float *restrict w, const float *restrict x, int ldx, int n, int k, float *out, int ldo) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *x0 = x + (int64_t)i * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int j = 0; j < k; j++) {
            a0 += w[j] * x0[j];
            a1 += w[j] * x1[j];
            a2 += w[j] * x2[j];
            a3 += w[j] * x3[j];
        }
        out[(int64_t)i * ldo] = a0;
        out[(int64_t)(i + 1) * ldo] = a1;
        out[(int64_t)(i + 2) * ldo] = a2;
        out[(int64_t)(i + 3) * ldo] = a3;
    }
    for (; i < n; i++) {
        const float *xi = x + (int64_t)i * ldx;
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int j = 0; j < k; j++) a += w[j] * xi[j];
        out[(int64_t)i * ldo] = a;
    }
}

/* x [M, D], offs [E] (inclusive row ends, nondecreasing, offs[E-1] == M), w1 [E, 2F, D], w2 [E, D, F],
 * h [M, 2F] scratch, y [M, D]. Returns 0, or -2 when offs is not a valid split of the M rows (nothing is
 * read then). */
int leanmoe_expert_mlp_f32(const float *x, const int32_t *offs, const float *w1, const float *w2, float *h,
                           float *y, int M, int E, int D, int F, int n_threads) {
    int prev = 0;
    for (int e = 0; e < E; e++) {
        if (offs[e] < prev || offs[e] > M) return -2;
        prev = offs[e];
    }
    if (prev != M) return -2;
    const int f_chunks = (2 * F + COLS - 1) / COLS, d_chunks = (D + COLS - 1) / COLS;
#pragma omp parallel num_threads(n_threads)
    {
        /* gate and up projections: h[r, c] for c < 2F */
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < E * f_chunks; item++) {
            const int e = item / f_chunks, c0 = (item % f_chunks) * COLS;
            const int lo = e ? offs[e - 1] : 0, n = offs[e] - lo;
            if (n == 0) continue;
            const int c1 = c0 + COLS < 2 * F ? c0 + COLS : 2 * F;
            for (int c = c0; c < c1; c++)
                dot_rows(w1 + ((int64_t)e * 2 * F + c) * D, x + (int64_t)lo * D, D, n, D, h + (int64_t)lo * 2 * F + c,
                         2 * F);
        }
        /* silu(gate) * up, in place in the first F columns */
#pragma omp for schedule(static)
        for (int r = 0; r < M; r++) {
            float *hr = h + (int64_t)r * 2 * F;
            for (int c = 0; c < F; c++) hr[c] = hr[c] / (1.f + expf(-hr[c])) * hr[F + c];
        }
        /* down projection: y[r, i] = w2[e, i] . h[r, :F] */
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < E * d_chunks; item++) {
            const int e = item / d_chunks, i0 = (item % d_chunks) * COLS;
            const int lo = e ? offs[e - 1] : 0, n = offs[e] - lo;
            if (n == 0) continue;
            const int i1 = i0 + COLS < D ? i0 + COLS : D;
            for (int i = i0; i < i1; i++)
                dot_rows(w2 + ((int64_t)e * D + i) * F, h + (int64_t)lo * 2 * F, 2 * F, n, F, y + (int64_t)lo * D + i, D);
        }
    }
    return 0;
}
