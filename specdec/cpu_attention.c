/* Attention for the runner on CPU (specdec/cpu_kernels.py builds it into one library with cpu_linear.c
   and cpu_layer.c, and loads it).

   Each query row attends to its own list of key slots: slots [0, prefix) of its session's
   cache, then `extra` slots in order (a tree node's ancestors and itself). Its output depends on
   nothing else: not on the other rows of the call, their number, the cache's length or the
   threads. Every number is made by one fixed sequence of operations on its own inputs: a score
   is one dot product (eight_sums' order), a weight one exp8, and a row's value sums run over its
   keys in order of j, split by j's parity. So a position's numbers are the same bits however it
   is computed: alone, in a prefill, batched with other sessions, or as a tree node reading its
   ancestors where they sit instead of in a chain. (The compiler may fuse multiplies and adds:
   it does so the same way wherever one loop runs, and one library computes every row.)

   Layouts (float32, contiguous): q and out [rows, heads, dim] (specdec_attend_projected reads the
   queries in the rows of a projection, further apart); keys and values of one layer [kv_heads,
   capacity, dim]; query head h reads kv head h / (heads / kv_heads). */

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "cpu_vector.h"

typedef struct {
    const float *q, *keys, *values;
    const int *prefix, *extra, *n_extra;
    int max_extra, heads, kv_heads, dim, capacity;
    float scale;
    float *out;
    long q_stride; /* floats from one row's queries to the next's */
} Job;

/* Where row `row`'s keys sit: offsets (slot * dim) of its n keys, in order. */
static void key_offsets(const Job *job, int row, long *offsets) {
    const int prefix = job->prefix[row], extra = job->n_extra[row];
    for (int j = 0; j < prefix; j++) offsets[j] = (long)j * job->dim;
    for (int j = 0; j < extra; j++) offsets[prefix + j] = (long)job->extra[(long)row * job->max_extra + j] * job->dim;
}

/* Scores s[0, n) (unscaled dot products) into unnormalised weights exp(scale s - max), and
   their sum: lanes over j mod 8, then the lanes in a fixed order, then the tail in order. */
static void softmax_weights(float *s, int n, float scale, float *total) {
    /* s is padded to a multiple of 8; the maximum (exact in any order) over the first n */
    v8 most = splat(-INFINITY);
    for (int j = 0; j < n; j += 8) {
        v8 x = load8(s + j) * splat(scale);
        store8(s + j, x);
        if (j + 8 > n) {
            const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7}, past = lane >= n - j;
            x = (v8)(((v8i)splat(-INFINITY) & past) | ((v8i)x & ~past));
        }
        const v8i higher = x > most;
        most = (v8)(((v8i)x & higher) | ((v8i)most & ~higher));
    }
    float top = -INFINITY;
    for (int t = 0; t < 8; t++) top = most[t] > top ? most[t] : top;
    v8 sum = splat(0);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const v8 w = exp8(load8(s + j) - splat(top));
        store8(s + j, w);
        sum = sum + w;
    }
    float rest = 0.0f;
    if (j < n) {
        float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(tail, s + j, sizeof(float) * (n - j));
        const v8 w = exp8(load8(tail) - splat(top));
        for (int t = 0; j + t < n; t++) s[j + t] = w[t], rest += w[t];
    }
    *total = lanes_sum(sum) + rest;
}

/* Eight sums of eight lanes each, one per vector, as one vector: ((l0 + l1) + (l2 + l3)) +
   ((l4 + l5) + (l6 + l7)) for every one of them. */
static inline v8 pair_sums(v8 a, v8 b) {
    return __builtin_shuffle(a, b, (v8i){0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(a, b, (v8i){1, 3, 9, 11, 5, 7, 13, 15});
}

static inline v8 eight_sums(v8 a, v8 b, v8 c, v8 d, v8 e, v8 f, v8 g, v8 h) {
    const v8 abcd = pair_sums(pair_sums(a, b), pair_sums(c, d)), efgh = pair_sums(pair_sums(e, f), pair_sums(g, h));
    return __builtin_shuffle(abcd, efgh, (v8i){0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(abcd, efgh, (v8i){4, 5, 6, 7, 12, 13, 14, 15});
}

/* Keys (and values) are read in blocks of this many, each by every row and query head of its kv
   head while it is in the nearest cache. Even, so that the value sums' split into even and odd
   keys carries on across blocks. */
#define KEY_BLOCK 32
/* Calls of fewer (query head, key) pairs run on the calling thread alone: below this, waking the
   team's other threads costs about what they would save. */
#define PARALLEL_FROM 1024

/* s[j] = q . key_j for keys [from, to) at `offsets` (`to` a multiple of 8; offsets past the
   row's keys point at a zero key): key j's products summed in eight lanes along dim, then the
   lanes as eight_sums does, so a score is a function of q and its key alone. */
static void scores_of(const float *q, const float *keys, const long *offsets, int from, int to, int dim, float *s) {
    for (int j = from; j < to; j += 8) {
        const float *k0 = keys + offsets[j], *k1 = keys + offsets[j + 1], *k2 = keys + offsets[j + 2],
                    *k3 = keys + offsets[j + 3], *k4 = keys + offsets[j + 4], *k5 = keys + offsets[j + 5],
                    *k6 = keys + offsets[j + 6], *k7 = keys + offsets[j + 7];
        v8 a0 = splat(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int c = 0; c < dim; c += 8) {
            const v8 x = load8(q + c);
            a0 = a0 + x * load8(k0 + c), a1 = a1 + x * load8(k1 + c);
            a2 = a2 + x * load8(k2 + c), a3 = a3 + x * load8(k3 + c);
            a4 = a4 + x * load8(k4 + c), a5 = a5 + x * load8(k5 + c);
            a6 = a6 + x * load8(k6 + c), a7 = a7 + x * load8(k7 + c);
        }
        store8(s + j, eight_sums(a0, a1, a2, a3, a4, a5, a6, a7));
    }
}

/* Adds keys [from, to) (from even) to the running sums of w[j] * value_j: per lane, even[] over
   the even keys and odd[] over the odd ones, each in order of j; the output is even + odd. Four
   chunks of eight lanes at a time, so that eight sums are in flight. */
static void add_values(const float *w, const float *values, const long *offsets, int from, int to, int dim,
                       float *even, float *odd) {
    int c = 0;
    for (; c + 32 <= dim; c += 32) {
        v8 e0 = load8(even + c), e1 = load8(even + c + 8), e2 = load8(even + c + 16), e3 = load8(even + c + 24);
        v8 o0 = load8(odd + c), o1 = load8(odd + c + 8), o2 = load8(odd + c + 16), o3 = load8(odd + c + 24);
        int j = from;
        for (; j + 2 <= to; j += 2) {
            const float *v = values + offsets[j] + c, *u = values + offsets[j + 1] + c;
            const v8 we = splat(w[j]), wo = splat(w[j + 1]);
            e0 = e0 + we * load8(v), e1 = e1 + we * load8(v + 8), e2 = e2 + we * load8(v + 16), e3 = e3 + we * load8(v + 24);
            o0 = o0 + wo * load8(u), o1 = o1 + wo * load8(u + 8), o2 = o2 + wo * load8(u + 16), o3 = o3 + wo * load8(u + 24);
        }
        if (j < to) {
            const float *v = values + offsets[j] + c;
            const v8 we = splat(w[j]);
            e0 = e0 + we * load8(v), e1 = e1 + we * load8(v + 8), e2 = e2 + we * load8(v + 16), e3 = e3 + we * load8(v + 24);
        }
        store8(even + c, e0), store8(even + c + 8, e1), store8(even + c + 16, e2), store8(even + c + 24, e3);
        store8(odd + c, o0), store8(odd + c + 8, o1), store8(odd + c + 16, o2), store8(odd + c + 24, o3);
    }
    for (; c < dim; c += 8) {
        v8 e = load8(even + c), o = load8(odd + c);
        int j = from;
        for (; j + 2 <= to; j += 2) {
            e = e + splat(w[j]) * load8(values + offsets[j] + c);
            o = o + splat(w[j + 1]) * load8(values + offsets[j + 1] + c);
        }
        if (j < to) e = e + splat(w[j]) * load8(values + offsets[j] + c);
        store8(even + c, e), store8(odd + c, o);
    }
}

/* Rows [row_from, row_to) of the query heads that read kv head g, keys in blocks of KEY_BLOCK:
   each block is read by every row and query head that attends to it while it sits in the nearest
   cache. The order of the work changes no number: each score is its own, and each row's value
   sums run over its keys in order of j. */
static int run_rows(const Job *job, int g, int row_from, int row_to) {
    const int group = job->heads / job->kv_heads, dim = job->dim, rows = row_to - row_from;
    if (rows <= 0) return 0;
    int most = 8;
    for (int r = row_from; r < row_to; r++) {
        const int n = job->prefix[r] + job->n_extra[r] + 8;
        most = n > most ? n : most;
    }
    float *scores = malloc(sizeof(float) * (size_t)rows * group * most);
    float *sums = calloc((size_t)rows * group * 2 * dim + dim, sizeof(float)); /* even, odd per query; a zero key */
    long *offsets = malloc(sizeof(long) * (size_t)rows * most);
    float *totals = malloc(sizeof(float) * (size_t)rows * group);
    if (!scores || !sums || !offsets || !totals) {
        free(scores), free(sums), free(offsets), free(totals);
        return -1;
    }
    const float *zero = sums + (size_t)rows * group * 2 * dim;
    int longest = 0;
    for (int i = 0; i < rows; i++) {
        const int n = job->prefix[row_from + i] + job->n_extra[row_from + i];
        key_offsets(job, row_from + i, offsets + (long)i * most);
        longest = n > longest ? n : longest;
    }
    const float *keys = job->keys + (long)g * job->capacity * dim;
    const float *values = job->values + (long)g * job->capacity * dim;
    for (int i = 0; i < rows; i++) { /* keys past a row's n, up to a multiple of 8: the zero key */
        const int n = job->prefix[row_from + i] + job->n_extra[row_from + i];
        for (int j = n; j % 8; j++) offsets[(long)i * most + j] = zero - keys;
    }
    for (int from = 0; from < longest; from += KEY_BLOCK)
        for (int i = 0; i < rows; i++) {
            const int r = row_from + i, padded = (job->prefix[r] + job->n_extra[r] + 7) / 8 * 8;
            if (padded <= from) continue;
            const int to = from + KEY_BLOCK < padded ? from + KEY_BLOCK : padded;
            for (int h = 0; h < group; h++)
                scores_of(job->q + (long)r * job->q_stride + ((long)g * group + h) * dim, keys, offsets + (long)i * most,
                          from, to, dim, scores + ((long)i * group + h) * most);
        }
    for (int i = 0; i < rows; i++) {
        const int n = job->prefix[row_from + i] + job->n_extra[row_from + i];
        for (int h = 0; h < group; h++)
            softmax_weights(scores + ((long)i * group + h) * most, n, job->scale, &totals[i * group + h]);
    }
    for (int from = 0; from < longest; from += KEY_BLOCK)
        for (int i = 0; i < rows; i++) {
            const int n = job->prefix[row_from + i] + job->n_extra[row_from + i];
            if (n <= from) continue;
            const int to = from + KEY_BLOCK < n ? from + KEY_BLOCK : n;
            for (int h = 0; h < group; h++) {
                float *even = sums + ((long)i * group + h) * 2 * dim;
                add_values(scores + ((long)i * group + h) * most, values, offsets + (long)i * most, from, to, dim,
                           even, even + dim);
            }
        }
    for (int i = 0; i < rows; i++) {
        const int r = row_from + i, n = job->prefix[r] + job->n_extra[r];
        for (int h = 0; h < group; h++) {
            const float *even = sums + ((long)i * group + h) * 2 * dim, *total = &totals[i * group + h];
            float *out = job->out + ((long)r * job->heads + (long)g * group + h) * dim;
            for (int c = 0; c < dim; c++) out[c] = n ? (even[c] + even[dim + c]) / *total : 0.0f;
        }
    }
    free(scores), free(sums), free(offsets), free(totals);
    return 0;
}

/* A thread's share of the call: the (kv head, row) pairs, in that order, whose keys read run
   from work * t / threads to work * (t + 1) / threads of the call's total. */
static int run_share(const Job *job, const int *keys_of, int rows, long work, int t, int threads) {
    const long from = work * t / threads, to = work * (t + 1) / threads;
    long done = 0;
    int failed = 0;
    for (int g = 0; g < job->kv_heads; g++) {
        int first = -1, last = -1;
        for (int r = 0; r < rows; r++) {
            if (done >= from && done < to) {
                if (first < 0) first = r;
                last = r + 1;
            }
            done += keys_of[r];
        }
        if (first >= 0) failed |= run_rows(job, g, first, last);
    }
    return failed;
}

/* Returns 0, or -1 when memory ran out (out is then incomplete). A call of enough work splits
   its (kv head, row) pairs among up to `threads` threads of the OpenMP team that torch's own
   parallel operations use (the same libgomp, already running and waiting in this process, so
   that a split costs microseconds); each row's numbers are the same whichever thread computes
   them. */
static int attend(const Job *job, int rows, int threads);

int specdec_attend(const float *q, const float *keys, const float *values, int capacity, const int *prefix,
                   const int *extra, const int *n_extra, int max_extra, int rows, int heads, int kv_heads,
                   int dim, float scale, float *out, int threads) {
    if (dim % 8 || heads % kv_heads) return -1;
    const Job job = {q, keys, values, prefix, extra, n_extra, max_extra, heads, kv_heads, dim, capacity, scale, out,
                     (long)heads * dim};
    return attend(&job, rows, threads);
}

/* The same for rows of a layer's projection qkv [rows, stride] (queries, keys, values side by
   side, as specdec_layer_project leaves them): first each row's keys and values into the cache at
   slots slot, slot + 1, ... (the copy the runner otherwise makes in torch), then its queries'
   attention, read where they are. The same numbers as specdec_attend on the copies. */
int specdec_attend_projected(const float *qkv, int stride, int slot, float *keys, float *values, int capacity,
                             const int *prefix, const int *extra, const int *n_extra, int max_extra, int rows,
                             int heads, int kv_heads, int dim, float scale, float *out, int threads) {
    if (dim % 8 || heads % kv_heads || slot < 0 || slot + rows > capacity || (heads + 2 * kv_heads) * dim > stride)
        return -1;
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < kv_heads; g++) {
            const float *row = qkv + (long)r * stride;
            const long at = ((long)g * capacity + slot + r) * dim;
            memcpy(keys + at, row + (long)(heads + g) * dim, sizeof(float) * dim);
            memcpy(values + at, row + (long)(heads + kv_heads + g) * dim, sizeof(float) * dim);
        }
    const Job job = {qkv, keys, values, prefix, extra, n_extra, max_extra, heads, kv_heads, dim, capacity, scale, out,
                     stride};
    return attend(&job, rows, threads);
}

static int attend(const Job *job, int rows, int threads) {
    if (rows <= 0) return 0;
    const int *prefix = job->prefix, *n_extra = job->n_extra;
    const int heads = job->heads, kv_heads = job->kv_heads;
    int *keys_of = malloc(sizeof(int) * (size_t)rows);
    if (!keys_of) return -1;
    long work = 0;
    for (int r = 0; r < rows; r++) {
        keys_of[r] = prefix[r] + n_extra[r] + 1; /* + 1: a row without keys still costs its output */
        work += keys_of[r];
    }
    work *= kv_heads;
    if (threads < 1 || work * (heads / kv_heads) < PARALLEL_FROM) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed) if (threads > 1)
    failed |= run_share(job, keys_of, rows, work, omp_get_thread_num(), omp_get_num_threads());
#else
    failed = run_share(job, keys_of, rows, work, 0, 1);
#endif
    free(keys_of);
    return failed ? -1 : 0;
}

/* 1 when built with OpenMP (long calls split among threads), else 0. */
int specdec_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
