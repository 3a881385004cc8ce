/* MLA decode over a paged latent cache on the CPU, fp32: leanmoe.kernels.mla_decode's contract
 * (see that module's docstring for the shapes and the math), for leanmoe.kernels.cpu_mla.
 *
 * Why a kernel: the batched torch path gathers every sequence's keys into a padded copy, then
 * reads that copy twice (scores, then values). With few heads the two products are matrix-vector
 * work, so their cost is memory traffic; here each key is read from its cache slot in place, once
 * for the scores of all the query rows of its sequence and once for the values.
 *
 * Work item: (sequence, chunk of query rows); row r = i * h_q + h (query i, head h). Per item:
 *   1. s[r, j] = scale * q[r] . K[j] for the keys it may see (j < limit(i)), -inf elsewhere
 *   2. m = max_j s, p = exp(s - m), l = sum_j p
 *   3. out[r] = sum_j p[r, j] K[j, :dv] / l;  lse[r] = m + log l
 * Rows that see no key (an empty sequence) get zeros and lse = -inf.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float dot(const float *restrict a, const float *restrict b, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* q . k for four keys at once: four independent accumulators, q read once */
static void dot4(const float *restrict q, const float *restrict k0, const float *restrict k1,
                 const float *restrict k2, const float *restrict k3, int n, float *out) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int i = 0; i < n; i++) {
        const float x = q[i];
        a0 += x * k0[i];
        a1 += x * k1[i];
        a2 += x * k2[i];
        a3 += x * k3[i];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

/* y += p0 k0 + p1 k1 + p2 k2 + p3 k3: y read and written once for four keys */
static void axpy4(float *restrict y, const float *p, const float *restrict k0, const float *restrict k1,
                  const float *restrict k2, const float *restrict k3, int n) {
    const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += p0 * k0[i] + p1 * k1[i] + p2 * k2[i] + p3 * k3[i];
}

static void axpy(float *restrict y, float a, const float *restrict x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

#define TILE 16 /* keys per tile: their rows (16 x 2.3 KB at d = 576) stay in L1/L2 while every query row passes */

/* Points keys[0 .. t) at keys j0 .. j0 + t of a sequence (its block-table row `table`) in the cache;
 * returns t, at most TILE. */
static int tile_keys(const float *kv, const int32_t *table, int block_size, int d, int n, int j0,
                     const float **keys) {
    const int t = n - j0 < TILE ? n - j0 : TILE;
    for (int jj = 0; jj < t; jj++) {
        const int j = j0 + jj;
        keys[jj] = kv + ((int64_t)table[j / block_size] * block_size + j % block_size) * d;
    }
    return t;
}

/* Returns 0; -1 when scratch memory could not be allocated (the outputs are then incomplete); before
 * reading anything, -2 when a length is negative or longer than its table row holds, -3 when a table
 * entry a sequence uses is not a block of the cache. */
int leanmoe_mla_decode_f32(const float *q, const float *kv, const int32_t *block_table, const int32_t *seqlens,
                           float *out, float *lse, int b, int s_q, int h_q, int d, int dv, int block_size,
                           int max_blocks, int n_blocks, float scale, int causal, int chunks_per_seq,
                           int n_threads) {
    for (int seq = 0; seq < b; seq++) { /* every slot read below lies in the cache */
        const int n = seqlens[seq];
        if (n < 0 || n > (int64_t)max_blocks * block_size) return -2;
        for (int i = 0; i < (n + block_size - 1) / block_size; i++) {
            const int32_t blk = block_table[(int64_t)seq * max_blocks + i];
            if (blk < 0 || blk >= n_blocks) return -3;
        }
    }
    const int rows = s_q * h_q;
    const int rows_per_chunk = (rows + chunks_per_seq - 1) / chunks_per_seq;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(| : failed)
    for (int item = 0; item < b * chunks_per_seq; item++) {
        const int seq = item / chunks_per_seq;
        const int r0 = (item % chunks_per_seq) * rows_per_chunk;
        const int r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
        if (r0 >= r1) continue;
        const int n = seqlens[seq];
        const int32_t *table = block_table + (int64_t)seq * max_blocks;
        float *scores = n > 0 ? malloc(sizeof(float) * (size_t)(r1 - r0) * (size_t)n) : NULL;
        if (n > 0 && scores == NULL) {
            failed = 1;
            continue;
        }
        const float *keys[TILE];
        /* 1. scores, a tile of keys at a time: each query row passes over the tile while it is in cache */
        for (int j0 = 0; j0 < n; j0 += TILE) {
            const int t = tile_keys(kv, table, block_size, d, n, j0, keys);
            for (int r = r0; r < r1; r++) {
                const float *qr = q + ((int64_t)seq * rows + r) * d;
                float *s = scores + (int64_t)(r - r0) * n + j0;
                int jj = 0;
                for (; jj + 4 <= t; jj += 4) dot4(qr, keys[jj], keys[jj + 1], keys[jj + 2], keys[jj + 3], d, s + jj);
                for (; jj < t; jj++) s[jj] = dot(qr, keys[jj], d);
                const int limit = causal ? n - (s_q - 1 - r / h_q) : n;
                for (jj = 0; jj < t; jj++) s[jj] = j0 + jj < limit ? scale * s[jj] : -INFINITY;
            }
        }
        /* 2. softmax numerators in place of the scores, 1/l per row for step 3, and the lse */
        float *inv_l = malloc(sizeof(float) * (size_t)(r1 - r0));
        if (inv_l == NULL) {
            free(scores);
            failed = 1;
            continue;
        }
        for (int r = r0; r < r1; r++) {
            float *s = scores + (int64_t)(r - r0) * n;
            float m = -INFINITY;
            for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
            const int64_t lse_at = ((int64_t)seq * h_q + r % h_q) * s_q + r / h_q;  /* lse [b, h_q, s_q] */
            if (m == -INFINITY) {  /* no visible key: contributes nothing in step 3 */
                memset(s, 0, sizeof(float) * (size_t)n);
                inv_l[r - r0] = 0.0f;
                lse[lse_at] = -INFINITY;
                continue;
            }
            float l = 0.0f;
            for (int j = 0; j < n; j++) {
                s[j] = expf(s[j] - m);
                l += s[j];
            }
            inv_l[r - r0] = 1.0f / l;
            lse[lse_at] = m + logf(l);
        }
        /* 3. values: the first dv columns of the keys, a tile at a time as in step 1 */
        for (int r = r0; r < r1; r++) memset(out + ((int64_t)seq * rows + r) * dv, 0, sizeof(float) * (size_t)dv);
        for (int j0 = 0; j0 < n; j0 += TILE) {
            const int t = tile_keys(kv, table, block_size, d, n, j0, keys);
            for (int r = r0; r < r1; r++) {
                float *o = out + ((int64_t)seq * rows + r) * dv;
                const float *p = scores + (int64_t)(r - r0) * n + j0;
                int jj = 0;
                for (; jj + 4 <= t; jj += 4) axpy4(o, p + jj, keys[jj], keys[jj + 1], keys[jj + 2], keys[jj + 3], dv);
                for (; jj < t; jj++) axpy(o, p[jj], keys[jj], dv);
            }
        }
        for (int r = r0; r < r1; r++) {
            float *o = out + ((int64_t)seq * rows + r) * dv;
            const float c = inv_l[r - r0];
            for (int v = 0; v < dv; v++) o[v] *= c;
        }
        free(inv_l);
        free(scores);
    }
    return failed ? -1 : 0;
}
