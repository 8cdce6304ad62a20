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
#include <stdlib.h>
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

/* A decoder layer's two halves around its attention, each one call: what the runner otherwise
   does in five and six (a norm, the products, the rotation, the activation, each its own call
   from Python, whose dispatch cost about a fifth of a one-token step on a fast CPU). The same
   kernels in the same order on the same numbers: the same bits as those calls. */

void specdec_linear(const float *x, int rows, int in, const float *packed, int outs, const float *bias,
                    const float *residual, float *out, int threads);
void specdec_linear_half(const float *x, int rows, int in, const void *packed, int outs, const float *bias,
                         const float *residual, float *out, int threads);
void specdec_linear_blocks(const float *x, int rows, int in, const void *packed, int format, int outs,
                           const float *bias, const float *residual, float *out, int threads);

/* One packed weight of the layer (specdec/cpu_kernels.py's PackedWeight): its format is
   cpu_linear.c's number (0 float32, 1 half precision, 2 Q4_1, 3 Q8_0). */
typedef struct {
    const void *packed;
    const float *bias; /* or NULL */
    int format, in, outs;
} Weight;

/* A layer's weights and shape (cpu_kernels.FusedLayer builds it once). */
typedef struct {
    Weight qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    float eps;
    int hidden, heads, kv_heads, head_dim;
} Layer;

/* out = x @ w.T (+ bias) (+ residual), by the weight's format */
static void product(const Weight *w, const float *x, int rows, const float *residual, float *out, int threads) {
    if (w->format == 0)
        specdec_linear(x, rows, w->in, (const float *)w->packed, w->outs, w->bias, residual, out, threads);
    else if (w->format == 1)
        specdec_linear_half(x, rows, w->in, w->packed, w->outs, w->bias, residual, out, threads);
    else
        specdec_linear_blocks(x, rows, w->in, w->packed, w->format, w->outs, w->bias, residual, out, threads);
}

/* qkv [rows, qkv.outs] = rotate(norm(x) @ qkv.T (+ bias)): the queries and keys rotated by the
   rows' cos and sin [rows, head_dim]. Returns 0, or -1 when memory ran out. */
int specdec_layer_project(const Layer *layer, const float *x, int rows, const float *cos, const float *sin,
                          float *qkv, int threads) {
    float *normed = malloc(sizeof(float) * (size_t)rows * layer->hidden);
    if (!normed) return -1;
    specdec_rms_norm(x, rows, layer->hidden, layer->input_norm, layer->eps, normed);
    product(&layer->qkv, normed, rows, NULL, qkv, threads);
    specdec_rotate(qkv, rows, layer->qkv.outs, layer->heads + layer->kv_heads, layer->head_dim, cos, sin);
    free(normed);
    return 0;
}

/* The rest of the layer: mid = x + attended @ o.T (+ bias), then out = mid + silu(gate) * up of
   norm(mid) @ gate_up.T, @ down.T (+ biases). x, out [rows, hidden]; attended [rows, o.in].
   Returns 0, or -1 when memory ran out. */
int specdec_layer_mix(const Layer *layer, const float *x, const float *attended, int rows, float *out,
                      int threads) {
    const int hidden = layer->hidden, inner = layer->gate_up.outs / 2;
    float *mid = malloc(sizeof(float) * (size_t)rows * hidden);
    float *normed = malloc(sizeof(float) * (size_t)rows * hidden);
    float *gate_up = malloc(sizeof(float) * (size_t)rows * 2 * inner);
    float *gated = malloc(sizeof(float) * (size_t)rows * inner);
    int status = -1;
    if (mid && normed && gate_up && gated) {
        product(&layer->o, attended, rows, x, mid, threads);
        specdec_rms_norm(mid, rows, hidden, layer->post_norm, layer->eps, normed);
        product(&layer->gate_up, normed, rows, NULL, gate_up, threads);
        specdec_silu_mul(gate_up, rows, inner, gated);
        product(&layer->down, gated, rows, mid, out, threads);
        status = 0;
    }
    free(mid), free(normed), free(gate_up), free(gated);
    return status;
}

int specdec_attend_projected(const float *qkv, int stride, int slot, float *keys, float *values, int capacity,
                             const int *prefix, const int *extra, const int *n_extra, int max_extra, int rows,
                             int heads, int kv_heads, int dim, float scale, float *out, int threads);

/* One session's rows of a pass (specdec_layers_forward): its cache kv [layers, 2 (keys, values),
   kv_heads, capacity, head_dim], its `rows` rows' keys and values written at slots [slot, slot +
   rows), and their key slots (prefix .. max_extra, specdec_attend's). */
typedef struct {
    float *kv;
    int capacity, slot, rows;
    const int *prefix, *extra, *n_extra;
    int max_extra;
} Span;

/* A pass of the sessions' rows (the spans' rows in order) through a model's layers [0, n): each
   layer as the runner calls it one layer at a time (specdec_layer_project over every row,
   specdec_attend_projected session by session, specdec_layer_mix over every row, in that order
   on the same numbers: the same bits), without a return to Python between them (from Python two
   calls a layer and one a session: about a tenth of a one-token step on the Zen 4 host). x [rows,
   hidden] the rows' embeddings; out [rows, hidden] the last layer's output; taps NULL or n
   pointers, where taps[i] is not NULL layer i's output [rows, hidden] copied there (the target's
   features). Every layer has the first's shape. Returns 0, or -1 when memory ran out or the
   attention refused its arguments. */
int specdec_layers_forward(const Layer *layers, int n, const Span *spans, int n_spans, float scale, const float *x,
                           int rows, const float *cos, const float *sin, float *const *taps, float *out,
                           int linear_threads, int attention_threads) {
    const Layer *first = layers;
    const int hidden = first->hidden, stride = first->qkv.outs, width = first->heads * first->head_dim;
    float *qkv = malloc(sizeof(float) * (size_t)rows * stride);
    float *attended = malloc(sizeof(float) * (size_t)rows * width);
    float *between[2] = {malloc(sizeof(float) * (size_t)rows * hidden), malloc(sizeof(float) * (size_t)rows * hidden)};
    int status = qkv && attended && between[0] && between[1] ? 0 : -1;
    const float *in = x;
    for (int i = 0; i < n && !status; i++) {
        const Layer *layer = layers + i;
        float *result = i == n - 1 ? out : between[i % 2];
        status = specdec_layer_project(layer, in, rows, cos, sin, qkv, linear_threads);
        for (int s = 0, row = 0; s < n_spans && !status; row += spans[s].rows, s++) {
            const Span *span = spans + s;
            const long cache = (long)layer->kv_heads * span->capacity * layer->head_dim; /* one layer's keys */
            float *keys = span->kv + 2 * i * cache, *values = keys + cache;
            status = specdec_attend_projected(qkv + (long)row * stride, stride, span->slot, keys, values,
                                              span->capacity, span->prefix, span->extra, span->n_extra,
                                              span->max_extra, span->rows, layer->heads, layer->kv_heads,
                                              layer->head_dim, scale, attended + (long)row * width,
                                              attention_threads);
        }
        if (!status) status = specdec_layer_mix(layer, in, attended, rows, result, linear_threads);
        if (!status && taps && taps[i]) memcpy(taps[i], result, sizeof(float) * (size_t)rows * hidden);
        in = result;
    }
    free(qkv), free(attended), free(between[0]), free(between[1]);
    return status;
}
