/* semguard's fused per-activation pass (detector/native.py builds and calls it).

   Each row of x (b, k) float32, k = channels * hw, is read once, in memory order, for:
   - sketch (b, dim) float32: fold(signs * x), out[j] = sum over i = j (mod dim) of signs[i] * x[i], each
     column summed in increasing i (the order of the eager fold's sum over rows of the (q, dim) view);
   - row_sums (b,) float64: sum of the row;
   - channel_sums (b, channels) float64: sum of each channel's hw values.
   sketch == NULL: no sketch (signs unused); channel_sums == NULL or channels == 0: the row is one channel. */
#include <stdint.h>
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
