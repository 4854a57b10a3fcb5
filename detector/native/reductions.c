/* semguard's native serving kernels (detector/native.py builds and calls them).

   semguard_sketch_channel_sums: each row of x (b, k) float32, k = channels * hw, is read once, in memory order, for:
   - sketch (b, dim) float32: fold(signs * x), out[j] = sum over i = j (mod dim) of signs[i] * x[i], each
     column summed in increasing i;
   - row_sums (b,) float64: sum of the row;
   - channel_sums (b, channels) float64: sum of each channel's hw values.
   sketch == NULL: no sketch (signs unused); channel_sums == NULL or channels == 0: the row is one channel. */
#include <stdint.h>
#include <math.h>
#include <string.h>

void semguard_sketch_channel_sums(const float *x, int64_t b, int64_t k, const float *signs, int64_t dim,
                                  int64_t channels, float *sketch, double *row_sums, double *channel_sums) {
    int64_t groups = channel_sums && channels > 0 ? channels : 1;
    int64_t hw = k / groups;
    for (int64_t r = 0; r < b; r++) {
        const float *xr = x + r * k;
        float *out = sketch ? sketch + r * dim : NULL;
        if (out) memset(out, 0, (size_t)dim * sizeof(float));
        double total = 0.0;
        int64_t i = 0;
        for (int64_t c = 0; c < groups; c++) {
            double acc = 0.0;
            int64_t end = c == groups - 1 ? k : i + hw;
            while (i < end) {  /* runs that do not wrap around the sketch's width */
                int64_t j = out ? i % dim : 0;
                int64_t run = out && dim - j < end - i ? dim - j : end - i;
                const float *xs = xr + i;
                if (out) {
                    const float *ss = signs + i;
                    float *o = out + j;
#pragma omp simd reduction(+ : acc)
                    for (int64_t u = 0; u < run; u++) {
                        o[u] += ss[u] * xs[u];
                        acc += (double)xs[u];
                    }
                } else {
#pragma omp simd reduction(+ : acc)
                    for (int64_t u = 0; u < run; u++) acc += (double)xs[u];
                }
                i += run;
            }
            if (channel_sums && channels > 0) channel_sums[r * channels + c] = acc;
            total += acc;
        }
        if (row_sums) row_sums[r] = total;
    }
}

/* Pearson r from sums over n items, zero variance on either side giving 0: detector/rsa.py's
   _pearson_from_moments, operation for operation (built with -ffp-contract=off: no fused multiply-adds,
   so every product and sum rounds as torch's float64 ops do; only sqrt may differ by an ulp, where
   torch's vectorised one is not correctly rounded). */
static double pearson(double n, double sx, double sxx, double sy, double syy, double sxy, double zero_variance) {
    double vx = sxx - sx * sx / n, vy = syy - sy * sy / n, cov = sxy - sx * sy / n;
    double ax = sxx < 0 ? -sxx : sxx, ay = syy < 0 ? -syy : syy;
    ax = ax < 1e-300 ? 1e-300 : ax;
    ay = ay < 1e-300 ? 1e-300 : ay;
    int degenerate = (vx <= zero_variance * ax) | (vy <= zero_variance * ay);
    double v = vx * vy;
    v = v < 1e-300 ? 1e-300 : v;  /* NaN stays NaN, as torch's clamp_min keeps it */
    double r = cov / sqrt(v);
    return degenerate ? 0.0 : r;
}

/* detector/signature.py's one_vs_two_margins for serving, one pass over the (L, B, M) margins.
   profiles (L, B, K), row_sums and row_squares (L, B) of the profiles, g (L, B, C) = profiles @ D^T,
   predicted (B,), alternatives (B, M), position (C,) (K: not a reference), d_padded (C, K + 1),
   d_sums and d_squares (C,) -> margin (L, B, M). */
void semguard_one_vs_two_margins(const double *profiles, const double *row_sums, const double *row_squares,
                                 const double *g, int64_t layers, int64_t b, int64_t k, int64_t c, int64_t m,
                                 const int64_t *predicted, const int64_t *alternatives, const int64_t *position,
                                 const double *d_padded, const double *d_sums, const double *d_squares,
                                 double zero_variance, double *margin) {
    for (int64_t bi = 0; bi < b; bi++) {
        int64_t p = predicted[bi], pp = position[p];
        const double *dp = d_padded + p * (k + 1);
        for (int64_t mi = 0; mi < m; mi++) {
            int64_t a = alternatives[bi * m + mi], pa = position[a];
            const double *da = d_padded + a * (k + 1);
            double n = ((double)k - (double)(pp < k)) - (double)(pa < k);
            double dp_pp = dp[pp], dp_pa = dp[pa], da_pp = da[pp], da_pa = da[pa];
            double sy = (d_sums[p] - dp_pp) - dp_pa, syy = (d_squares[p] - dp_pp * dp_pp) - dp_pa * dp_pa;
            double sz = (d_sums[a] - da_pp) - da_pa, szz = (d_squares[a] - da_pp * da_pp) - da_pa * da_pa;
            for (int64_t l = 0; l < layers; l++) {
                int64_t row = l * b + bi;
                const double *i = profiles + row * k;
                double i_pp = pp < k ? i[pp] : 0.0, i_pa = pa < k ? i[pa] : 0.0;
                double si = (row_sums[row] - i_pp) - i_pa;
                double sii = (row_squares[row] - i_pp * i_pp) - i_pa * i_pa;
                double siy = (g[row * c + p] - i_pp * dp_pp) - i_pa * dp_pa;
                double siz = (g[row * c + a] - i_pp * da_pp) - i_pa * da_pa;
                margin[row * m + mi] = pearson(n, si, sii, sy, syy, siy, zero_variance)
                                       - pearson(n, si, sii, sz, szz, siz, zero_variance);
            }
        }
    }
}
