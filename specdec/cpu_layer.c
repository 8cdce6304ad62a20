/* A decoder layer's small steps for the runner on CPU, between its products and its attention:
   the RMS norms, the rotary embedding and the gated activation (built with cpu_attention.c and
   cpu_linear.c into one library by specdec/cpu_kernels.py).

   In torch each of these is several small operations (a norm is seven), whose dispatch costs
   more than their arithmetic at a step's few rows; here each is one call. Every number is one
   fixed sequence of operations on its own row, so a row's results do not depend on the other
   rows of the call (the invariance the runner keeps, see specdec/runner.py). They differ from
   torch's in the last bits (sums in another order), as every kernel of this library does.

   Layouts (float32, contiguous rows). */

#include <math.h>
#include <string.h>

#include "cpu_vector.h"

/* out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)), rows of `dim` (Llama's RMSNorm): the
   squares summed in eight lanes along the row, the lanes in a fixed order, then the tail. */
void specdec_rms_norm(const float *x, int rows, int dim, const float *weight, float eps, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (long)r * dim;
        float *o = out + (long)r * dim;
        v8 squares = splat(0.0f);
        int c = 0;
        for (; c + 8 <= dim; c += 8) {
            const v8 v = load8(row + c);
            squares += v * v;
        }
        float sum = lanes_sum(squares);
        for (; c < dim; c++) sum += row[c] * row[c];
        const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        for (c = 0; c < dim; c++) o[c] = weight[c] * (row[c] * scale);
    }
}

/* In place, the first `heads` heads (of `dim` floats) of each row (rows `stride` floats apart):
   v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[half:], v[:half]); cos and sin
   [rows, dim], the row's position's. */
void specdec_rotate(float *x, int rows, int stride, int heads, int dim, const float *cos, const float *sin) {
    const int half = dim / 2;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (long)r * dim, *s = sin + (long)r * dim;
        for (int h = 0; h < heads; h++) {
            float *v = x + (long)r * stride + (long)h * dim;
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + -b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* silu(g) * u, eight at once: silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) (so exp8's
   argument is never positive): 1 / (1 + e) where g >= 0, e / (1 + e) where g < 0. */
static inline v8 silu_times(v8 g, v8 u) {
    const v8 e = exp8((v8)((v8i)g | (v8i)splat(-0.0f))); /* -|g|: the sign bit set */
    const v8i negative = g < splat(0.0f);
    const v8 one = splat(1.0f), numerator = (v8)(((v8i)e & negative) | ((v8i)one & ~negative));
    return g * (numerator / (one + e)) * u;
}

/* out[r] = silu(gate) * up, where gate_up[r] = (gate, up), `inner` floats each. */
void specdec_silu_mul(const float *gate_up, int rows, int inner, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *gate = gate_up + (long)r * 2 * inner, *up = gate + inner;
        float *o = out + (long)r * inner;
        int i = 0;
        for (; i + 8 <= inner; i += 8) store8(o + i, silu_times(load8(gate + i), load8(up + i)));
        if (i < inner) { /* the tail through the same vector code, padded with zeros */
            float g[8] = {0}, u[8] = {0}, result[8];
            memcpy(g, gate + i, sizeof(float) * (inner - i));
            memcpy(u, up + i, sizeof(float) * (inner - i));
            store8(result, silu_times(load8(g), load8(u)));
            memcpy(o + i, result, sizeof(float) * (inner - i));
        }
    }
}
