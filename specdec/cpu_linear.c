/* Matrix products for the runner on CPU: out = x @ w.T (+ bias) (+ residual), built and loaded
   with cpu_attention.c and cpu_layer.c by specdec/cpu_kernels.py.

   Every output element is one chain of multiply-adds over the inputs in order,
   acc = acc + x[r][i] * w[o][i] for i = 0 .. in-1 from zero, then + bias[o], then residual[r][o]
   + that: the same operations
   whatever the call's row count, the row's place in it, the other rows or the threads. So a
   row's outputs are the same bits alone, in a verify of k + 1 rows, batched with other sessions
   or in a prefill, which the BLAS's products (whose kernels and blocking change with the row
   count) do not promise. (The compiler fuses each multiply-add the same way in every variant of
   the tile below, and one library computes every row.)

   Speed: at a step's few rows a product reads its weights once and does little arithmetic on
   them, so it runs at the speed memory streams the weights. The weights are packed once (by
   specdec/cpu_kernels.py) into tiles of TILE outputs, each tile [in][TILE] contiguous, read in
   order with a prefetch ahead, and each tile's weights serve up to MAX_ROWS rows from registers
   (more rows re-read the tile from the core's cache). The tiles are split among torch's OpenMP
   threads.

   Layouts (float32, contiguous): x [rows, in]; packed [tiles, in, TILE] (outputs past `outs` in
   the last tile are zero); bias [outs] or NULL; residual and out [rows, outs] (residual may be
   NULL).

   specdec_linear_half is the same product on weights packed in IEEE half precision (the feature
   drafter's float16 weights): each weight is widened to float32 as it is read (exactly), the sums
   are float32 as above. At a drafting step's one row a product reads its weights and little else,
   so half the bytes is nearly half the time; torch's own float16 product on a CPU does not reach
   that (bench/RESULTS.md). Built only for CPUs with AVX-512 or F16C (specdec_linear_half_built). */

#ifdef _OPENMP
#include <omp.h>
#endif
#include <string.h>

#define LANES 16              /* floats in one vector */
#define VECTORS 2             /* vectors of outputs in a tile */
#define TILE (LANES * VECTORS) /* outputs in a tile: cpu_kernels.py's LINEAR_TILE */
#define MAX_ROWS 12           /* rows whose sums a tile holds in registers at once */
#define PREFETCH 16           /* inputs ahead of the one being read: a tile's next 4 KB */
#define ROW_BLOCK 96          /* rows whose inputs stay in the core's cache while every tile passes over them */
#define PARALLEL_FROM 65536   /* multiply-adds (rows * in * outs) from which a call splits */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sixteen half-precision weights widened to float32 (exactly), by the CPU's conversion
   instructions: AVX-512's sixteen at once, or F16C's eight twice. Elsewhere no half kernel. */
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#define HALF_WEIGHTS 1
static inline v16 load16_half(const unsigned short *p) {
    v16 v;
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&v, &wide, sizeof v);
#else
    const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 high = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    memcpy(&v, &low, sizeof low);
    memcpy((char *)&v + sizeof low, &high, sizeof high);
#endif
    return v;
}
#else
#define HALF_WEIGHTS 0
#endif

static inline v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* Rows [0, rows) of x times one tile: `rows` is a constant wherever this is inlined (tile_rows),
   so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int in, const void *weights_tile,
                                                       int half, const float *bias, const float *residual,
                                                       int valid, float *out, int outs, int rows) {
    const float *w = weights_tile;
    const unsigned short *w_half = weights_tile;
    v16 sums[MAX_ROWS][VECTORS];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < VECTORS; c++) sums[r][c] = splat16(0.0f);
    for (int i = 0; i < in; i++) {
        v16 weights[VECTORS];
        if (half) { /* a tile's row of half weights is one 64-byte line */
#if HALF_WEIGHTS
            __builtin_prefetch(w_half + (long)(i + 2 * PREFETCH) * TILE);
#pragma GCC unroll 4
            for (int c = 0; c < VECTORS; c++) weights[c] = load16_half(w_half + (long)i * TILE + LANES * c);
#endif
        } else {
            __builtin_prefetch(w + (long)(i + PREFETCH) * TILE);
            __builtin_prefetch(w + (long)(i + PREFETCH) * TILE + LANES);
#pragma GCC unroll 4
            for (int c = 0; c < VECTORS; c++) weights[c] = load16(w + (long)i * TILE + LANES * c);
        }
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++) {
            const v16 input = splat16(x[(long)r * in + i]);
#pragma GCC unroll 4
            for (int c = 0; c < VECTORS; c++) sums[r][c] += input * weights[c];
        }
    }
    for (int r = 0; r < rows; r++) {
        float row[TILE];
        memcpy(row, sums[r], sizeof row);
        if (bias)
            for (int o = 0; o < valid; o++) row[o] += bias[o];
        if (residual)
            for (int o = 0; o < valid; o++) row[o] = residual[(long)r * outs + o] + row[o];
        memcpy(out + (long)r * outs, row, sizeof(float) * valid);
    }
}

#define ROWS_CASE(n, half) \
    case n: tile(x, in, w, half, bias, residual, valid, out, outs, n); break;
#define ROWS_CASES(half) \
    ROWS_CASE(1, half) ROWS_CASE(2, half) ROWS_CASE(3, half) ROWS_CASE(4, half) ROWS_CASE(5, half) \
    ROWS_CASE(6, half) ROWS_CASE(7, half) ROWS_CASE(8, half) ROWS_CASE(9, half) ROWS_CASE(10, half) \
    ROWS_CASE(11, half) ROWS_CASE(12, half)

static void tile_rows(const float *x, int in, const void *w, int half, const float *bias, const float *residual,
                      int valid, float *out, int outs, int rows) {
    if (half) {
        switch (rows) { ROWS_CASES(1) }
    } else {
        switch (rows) { ROWS_CASES(0) }
    }
}

/* Tiles [from, to) over all rows: ROW_BLOCK rows at a time (their inputs stay in the core's cache
   while the tiles pass), and within those each tile MAX_ROWS rows at a time (the tile stays in
   the core's cache between them). */
static void run_tiles(const float *x, int rows, int in, const void *packed, int half, int outs, const float *bias,
                      const float *residual, float *out, int from, int to) {
    const long tile_bytes = (long)in * TILE * (half ? sizeof(unsigned short) : sizeof(float));
    for (int block = 0; block < rows; block += ROW_BLOCK) {
        const int block_end = block + ROW_BLOCK < rows ? block + ROW_BLOCK : rows;
        for (int t = from; t < to; t++) {
            const int first = t * TILE, valid = outs - first < TILE ? outs - first : TILE;
            for (int r = block; r < block_end; r += MAX_ROWS)
                tile_rows(x + (long)r * in, in, (const char *)packed + t * tile_bytes, half, bias ? bias + first : 0,
                          residual ? residual + (long)r * outs + first : 0, valid, out + (long)r * outs + first,
                          outs, block_end - r < MAX_ROWS ? block_end - r : MAX_ROWS);
        }
    }
}

/* out = x @ w.T (+ bias) (+ residual), w packed as above (`half`: in half precision). A call of
   enough work splits its tiles among up to `threads` threads of torch's OpenMP team. */
static void linear(const float *x, int rows, int in, const void *packed, int half, int outs, const float *bias,
                   const float *residual, float *out, int threads) {
    const int tiles = (outs + TILE - 1) / TILE;
    if (rows <= 0 || tiles <= 0) return;
    if (threads > tiles) threads = tiles;
    if (threads < 1 || (long)rows * in * outs < PARALLEL_FROM) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        run_tiles(x, rows, in, packed, half, outs, bias, residual, out, (int)((long)tiles * t / n),
                  (int)((long)tiles * (t + 1) / n));
    }
#else
    run_tiles(x, rows, in, packed, half, outs, bias, residual, out, 0, tiles);
#endif
}

void specdec_linear(const float *x, int rows, int in, const float *packed, int outs, const float *bias,
                    const float *residual, float *out, int threads) {
    linear(x, rows, in, packed, 0, outs, bias, residual, out, threads);
}

/* The same product on half-precision packed weights; does nothing where no half kernel was built. */
void specdec_linear_half(const float *x, int rows, int in, const void *packed, int outs, const float *bias,
                         const float *residual, float *out, int threads) {
    if (HALF_WEIGHTS) linear(x, rows, in, packed, 1, outs, bias, residual, out, threads);
}

/* Whether specdec_linear_half computes (the CPU converts half precision: AVX-512 or F16C). */
int specdec_linear_half_built(void) { return HALF_WEIGHTS; }

/* The tile width packed weights must have (cpu_kernels.py checks it against LINEAR_TILE). */
int specdec_linear_tile(void) { return TILE; }
