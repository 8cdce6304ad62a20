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
   NULL). */

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

static inline v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* Rows [0, rows) of x times one tile: `rows` is a constant wherever this is inlined (tile_rows),
   so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int in, const float *w, const float *bias,
                                                       const float *residual, int valid, float *out, int outs,
                                                       int rows) {
    v16 sums[MAX_ROWS][VECTORS];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < VECTORS; c++) sums[r][c] = splat16(0.0f);
    for (int i = 0; i < in; i++) {
        __builtin_prefetch(w + (long)(i + PREFETCH) * TILE);
        __builtin_prefetch(w + (long)(i + PREFETCH) * TILE + LANES);
        v16 weights[VECTORS];
#pragma GCC unroll 4
        for (int c = 0; c < VECTORS; c++) weights[c] = load16(w + (long)i * TILE + LANES * c);
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

#define ROWS_CASE(n) \
    case n: tile(x, in, w, bias, residual, valid, out, outs, n); break;

static void tile_rows(const float *x, int in, const float *w, const float *bias, const float *residual, int valid,
                      float *out, int outs, int rows) {
    switch (rows) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
        ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
    }
}

/* Tiles [from, to) over all rows: ROW_BLOCK rows at a time (their inputs stay in the core's cache
   while the tiles pass), and within those each tile MAX_ROWS rows at a time (the tile stays in
   the core's cache between them). */
static void run_tiles(const float *x, int rows, int in, const float *packed, int outs, const float *bias,
                      const float *residual, float *out, int from, int to) {
    for (int block = 0; block < rows; block += ROW_BLOCK) {
        const int block_end = block + ROW_BLOCK < rows ? block + ROW_BLOCK : rows;
        for (int t = from; t < to; t++) {
            const int first = t * TILE, valid = outs - first < TILE ? outs - first : TILE;
            for (int r = block; r < block_end; r += MAX_ROWS)
                tile_rows(x + (long)r * in, in, packed + (long)t * in * TILE, bias ? bias + first : 0,
                          residual ? residual + (long)r * outs + first : 0, valid, out + (long)r * outs + first,
                          outs, block_end - r < MAX_ROWS ? block_end - r : MAX_ROWS);
        }
    }
}

/* out = x @ w.T (+ bias) (+ residual), w packed as above. A call of enough work splits its tiles
   among up to `threads` threads of torch's OpenMP team. */
void specdec_linear(const float *x, int rows, int in, const float *packed, int outs, const float *bias,
                    const float *residual, float *out, int threads) {
    const int tiles = (outs + TILE - 1) / TILE;
    if (rows <= 0 || tiles <= 0) return;
    if (threads > tiles) threads = tiles;
    if (threads < 1 || (long)rows * in * outs < PARALLEL_FROM) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        run_tiles(x, rows, in, packed, outs, bias, residual, out, (int)((long)tiles * t / n),
                  (int)((long)tiles * (t + 1) / n));
    }
#else
    run_tiles(x, rows, in, packed, outs, bias, residual, out, 0, tiles);
#endif
}

/* The tile width packed weights must have (cpu_kernels.py checks it against LINEAR_TILE). */
int specdec_linear_tile(void) { return TILE; }
