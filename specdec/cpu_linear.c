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
   each, so it runs at the speed memory streams the weights (or, where memory keeps up, at the
   speed the core widens the blocks below, a few vector operations a vector of weights). The weights are packed once (by
   specdec/cpu_kernels.py) into tiles of TILE outputs, each tile [in][TILE] contiguous, read in
   order while the next tile is prefetched (next_tile_prefetch), and each tile's weights serve a
   pass of rows whose sums stay in registers (12 rows on AVX-512; on AVX2 3 over the whole tile,
   or 6 over half of it at a time); more rows re-read the tile from the core's cache. The tiles
   are split among torch's OpenMP threads.

   Layouts (float32, contiguous): x [rows, in]; packed [tiles, in, TILE] (outputs past `outs` in
   the last tile are zero); bias [outs] or NULL; residual and out [rows, outs] (residual may be
   NULL).

   specdec_linear_half is the same product on weights packed in IEEE half precision (the feature
   drafter's float16 weights): each weight is widened to float32 as it is read (exactly), the sums
   are float32 as above. At a drafting step's one row a product reads its weights and little else,
   so half the bytes is nearly half the time; torch's own float16 product on a CPU does not reach
   that (bench/RESULTS.md). Built only for CPUs with AVX-512, or AVX2 and F16C (specdec_linear_half_built).

   specdec_linear_blocks is the same product on weights packed in GGML's blocks (Q4_1, Q8_0): a
   .gguf model's float32 weights are exactly d * q (+ m) of such blocks (specdec/ggml_blocks.py
   finds and checks them), so each block is widened in registers back to those float32 numbers
   (exact arithmetic, see q4_1_weights) and the sums run as above: the bits of the float32 product,
   from a sixth (Q4_1) or a quarter (Q8_0) of the bytes. Built where the half kernel is (the
   blocks' scales are half precision). */

#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

/* The vector width: AVX-512's sixteen floats, else eight (AVX2's, and GCC's generic vectors). A tile
   is TILE outputs whatever the width (the packing does not depend on the CPU); what the width sets
   is how many rows' sums fit in the registers: AVX-512 has 32 vector registers, AVX2 16. */
#if defined(__AVX512F__)
#define LANES 16
#define MAX_ROWS 12           /* rows whose sums a pass holds in registers at once (2 vectors a row) */
#define WHOLE_ROWS 12         /* the same for passes over a whole tile */
#else
#define LANES 8
#define MAX_ROWS 6            /* half a tile a pass, 2 vectors a row: 12 sums, the weights and an input in 4 more */
#define WHOLE_ROWS 3          /* a whole tile a pass, 4 vectors a row: 12 sums; calls of up to 3 rows */
#endif
#define TILE 32               /* outputs in a tile: cpu_kernels.py's LINEAR_TILE */
#define VECTORS (TILE / LANES) /* vectors of outputs in a tile */
#define PART_VECTORS 2        /* vectors of outputs a pass of more than WHOLE_ROWS rows computes: a part of the tile */
#define PART (PART_VECTORS * LANES) /* outputs in a part: the whole tile on AVX-512, half on AVX2 */
#define PARTS (TILE / PART)
_Static_assert(PARTS == 1 || PARTS == 2, "tile_rows computes part 0, or parts 0 and 1");
#define ROW_BLOCK 96          /* rows whose inputs stay in the core's cache while every tile passes over them */
#define PARALLEL_FROM 65536   /* multiply-adds (rows * in * outs) from which a call splits */
#define WIDEN_ONCE_ABOVE 12   /* rows from which a tile in blocks is widened once into a scratch tile (run_tiles) */

/* Weight formats (cpu_kernels.py's BLOCK_FORMATS numbers the two block formats) */
#define FLOAT32 0
#define HALF 1
#define Q4_1 2 /* GGML's: per BLOCK inputs of an output a half scale d and offset m, 4-bit codes */
#define Q8_0 3 /* GGML's: per BLOCK inputs of an output a half scale d, 8-bit signed codes */
#define BLOCK 32 /* inputs in one of GGML's blocks */
/* A tile's block of BLOCK inputs: Q4_1 d[TILE], m[TILE] (half), then per input TILE / 2 bytes of
   codes; Q8_0 d[TILE] (half), then per input TILE signed bytes. */
#define Q4_1_BLOCK_BYTES (2 * TILE * 2 + BLOCK * TILE / 2)
#define Q8_0_BLOCK_BYTES (TILE * 2 + BLOCK * TILE)
#define block_bytes(format) ((format) == Q4_1 ? Q4_1_BLOCK_BYTES : Q8_0_BLOCK_BYTES)

typedef float vf __attribute__((vector_size(LANES * 4)));

static inline vf load_vf(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* (an initializer, which GCC makes one broadcast; a loop over the lanes it builds lane by lane) */
static inline vf splat_vf(float x) {
#if LANES == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x, x, x, x, x};
#endif
}

/* LANES half-precision weights widened to float32 (exactly), by the CPU's conversion instructions
   (AVX-512's or F16C's). Elsewhere no half kernel. */
#if (defined(__AVX512F__) || defined(__F16C__)) && (LANES == 16 || defined(__AVX2__))
#include <immintrin.h>
#define HALF_WEIGHTS 1
static inline vf load_half(const unsigned short *p) {
    vf v;
#if LANES == 16
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
    memcpy(&v, &wide, sizeof v);
    return v;
}
#else
#define HALF_WEIGHTS 0
#endif

/* Sums of rows [0, rows) of x at input i times one input's weights of a part of a tile
   (`weights`): the one multiply-add a sum takes per input, whatever the weights' format. */
static inline __attribute__((always_inline)) void accumulate(vf sums[MAX_ROWS][VECTORS], const float *x, int in,
                                                             int i, const vf weights[VECTORS], int rows, int vectors) {
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) {
        const vf input = splat_vf(x[(long)r * in + i]);
#pragma GCC unroll 4
        for (int c = 0; c < vectors; c++) sums[r][c] += input * weights[c];
    }
}

/* `bytes` at `at` in the tile `next` on their way into the core's L2 cache (prefetch locality 2):
   the same block, or input, as the one being read of this tile, in the next tile this thread
   computes (`next` NULL where there is none: the range's last tile, a scratch tile's passes, a
   tile's later passes). Spread over the current tile's arithmetic this keeps the memory busy
   while the core computes: where the weights do not fit the cache (a 2-core slice of a big Xeon,
   bench/RESULTS.md) a step's products ran at half the speed with a prefetch a few blocks ahead in
   the same tile only, and with a burst of the whole next tile at a tile's start at two thirds.
   (Outside the half kernel's #if: every format prefetches.) */
static inline __attribute__((always_inline)) void next_tile_prefetch(const void *next, long at, int bytes) {
    if (!next) return;
    for (int line = 0; line < bytes; line += 64) __builtin_prefetch((const char *)next + at + line, 0, 2);
}

#if HALF_WEIGHTS
typedef int vi __attribute__((vector_size(LANES * 4)));

/* LANES bytes widened to LANES ints (zero- or sign-extended) by the CPU's widening loads (GCC's
   generic conversion of byte vectors goes byte by byte). */
static inline vi widen(const void *p, int is_signed) {
    vi v;
#if LANES == 16
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m512i wide = is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
#else
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    const __m256i wide = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
#endif
    memcpy(&v, &wide, sizeof v);
    return v;
}

/* The scales (or offsets) of a block's part `part` of a tile (`vectors` vectors of outputs), in
   half precision, widened. */
static inline __attribute__((always_inline)) void load_scales(const unsigned short *p, vf out[VECTORS],
                                                              int vectors, int part) {
#pragma GCC unroll 4
    for (int c = 0; c < vectors; c++) out[c] = load_half(p + part * vectors * LANES + LANES * c);
}

/* One input's TILE weights of a Q4_1 block (GGML's 4-bit blocks with an offset): w = d * q + m
   for q of 4 bits, d and m the block's half-precision scale and offset. d * q is exact in float32
   (11 + 4 significant bits), so the one rounding of d * q + m gives the bits GGML's
   dequantization (d * q, then + m) gives, fused into one multiply-add or not. `codes`: the
   input's TILE / 2 bytes, byte o output o's code in its low half, output o + TILE / 2's in its
   high. Those of part `part` of the tile. */
static inline __attribute__((always_inline)) void q4_1_weights(const unsigned char *codes, const vf scale[VECTORS],
                                                               const vf offset[VECTORS], vf weights[VECTORS],
                                                               int vectors, int part) {
#pragma GCC unroll 4
    for (int c = 0; c < vectors; c++) {
        const int first = part * vectors * LANES + LANES * c; /* the vector's first output */
        const vi bytes = widen(codes + first % (TILE / 2), 0);
        const vi q = first < TILE / 2 ? bytes & 15 : bytes >> 4;
        weights[c] = scale[c] * __builtin_convertvector(q, vf) + offset[c];
    }
}

/* One input's TILE weights of a Q8_0 block (GGML's 8-bit blocks): w = d * q for q of 8 bits, exact
   in float32 (11 + 8 significant bits), as GGML's dequantization gives it. */
static inline __attribute__((always_inline)) void q8_0_weights(const unsigned char *codes, const vf scale[VECTORS],
                                                               vf weights[VECTORS], int vectors, int part) {
#pragma GCC unroll 4
    for (int c = 0; c < vectors; c++)
        weights[c] = scale[c] * __builtin_convertvector(widen(codes + part * vectors * LANES + LANES * c, 1), vf);
}

/* The weights of part `part` of one tile in blocks (`format` Q4_1 or Q8_0; parts of `vectors`
   vectors of outputs), input by input in order, each handed to `use` (a statement that reads `i`
   and `weights`), while the same blocks of the tile at `next` (or NULL) are prefetched. */
#define FOR_BLOCK_WEIGHTS(format, tile, next, in, vectors, part, use)                                  \
    for (int block = 0; block < (in) / BLOCK; block++) {                                               \
        const unsigned char *start = (const unsigned char *)(tile) + (long)block * block_bytes(format); \
        vf scale[VECTORS], offset[VECTORS];                                                           \
        load_scales((const unsigned short *)start, scale, vectors, part);                              \
        if ((format) == Q4_1) load_scales((const unsigned short *)start + TILE, offset, vectors, part); \
        const unsigned char *codes = start + ((format) == Q4_1 ? 4 : 2) * TILE;                       \
        next_tile_prefetch(next, (long)block * block_bytes(format), block_bytes(format));             \
        for (int j = 0; j < BLOCK; j++) {                                                              \
            const int i = block * BLOCK + j;                                                           \
            vf weights[VECTORS];                                                                       \
            if ((format) == Q4_1)                                                                      \
                q4_1_weights(codes + j * TILE / 2, scale, offset, weights, vectors, part);             \
            else                                                                                       \
                q8_0_weights(codes + j * TILE, scale, weights, vectors, part);                         \
            use;                                                                                       \
        }                                                                                              \
    }

/* A tile in blocks written out as float32 weights [in][TILE] (the float32 packing's tile): for
   calls of more than WIDEN_ONCE_ABOVE rows, so that each pass reads float32 weights from the
   core's cache instead of widening the blocks again. */
static inline __attribute__((always_inline)) void store_weights(float *out, const vf weights[VECTORS]) {
#pragma GCC unroll 4
    for (int c = 0; c < VECTORS; c++) memcpy(out + LANES * c, &weights[c], sizeof(vf)); /* one store each */
}

static void dequantize_tile(const void *tile, const void *next, int in, int format, float *out) {
    if (format == Q4_1)
        FOR_BLOCK_WEIGHTS(Q4_1, tile, next, in, VECTORS, 0, store_weights(out + (long)i * TILE, weights))
    else
        FOR_BLOCK_WEIGHTS(Q8_0, tile, next, in, VECTORS, 0, store_weights(out + (long)i * TILE, weights))
}
#endif

/* Rows [0, rows) of x times part `part` of one tile of weights in `format`, parts of `vectors`
   vectors of outputs (outputs part * vectors * LANES ..; `valid` of the tile's real; bias,
   residual and out point at the tile's first; `next` the tile to prefetch meanwhile, or NULL):
   `rows`, `format`, `vectors` and `part` are constants wherever this is inlined (tile_rows), so
   the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int in, const void *weights_tile,
                                                       const void *next, int format, const float *bias,
                                                       const float *residual, int valid, float *out, int outs,
                                                       int rows, int vectors, int part) {
    const int first = part * vectors * LANES, width = vectors * LANES; /* the part's outputs in the tile */
    const float *w = (const float *)weights_tile + first;
    const unsigned short *w_half = (const unsigned short *)weights_tile + first;
    vf sums[MAX_ROWS][VECTORS];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < vectors; c++) sums[r][c] = splat_vf(0.0f);
    if (format == FLOAT32 || format == HALF) {
        for (int i = 0; i < in; i++) {
            vf weights[VECTORS];
            if (format == HALF) { /* a tile's row of half weights is one 64-byte line */
#if HALF_WEIGHTS
                next_tile_prefetch(next, (long)i * TILE * 2, TILE * 2);
#pragma GCC unroll 4
                for (int c = 0; c < vectors; c++) weights[c] = load_half(w_half + (long)i * TILE + LANES * c);
#endif
            } else {
                next_tile_prefetch(next, (long)i * TILE * 4, TILE * 4);
#pragma GCC unroll 4
                for (int c = 0; c < vectors; c++) weights[c] = load_vf(w + (long)i * TILE + LANES * c);
            }
            accumulate(sums, x, in, i, weights, rows, vectors);
        }
    }
#if HALF_WEIGHTS
    else if (format == Q4_1)
        FOR_BLOCK_WEIGHTS(Q4_1, weights_tile, next, in, vectors, part,
                          accumulate(sums, x, in, i, weights, rows, vectors))
    else if (format == Q8_0)
        FOR_BLOCK_WEIGHTS(Q8_0, weights_tile, next, in, vectors, part,
                          accumulate(sums, x, in, i, weights, rows, vectors))
#endif
    valid -= first;
    if (valid > width) valid = width;
    for (int r = 0; r < rows; r++) {
        float row[TILE];
        memcpy(row, sums[r], sizeof(vf) * vectors);
        if (bias)
            for (int o = 0; o < valid; o++) row[o] += bias[first + o];
        if (residual)
            for (int o = 0; o < valid; o++) row[o] = residual[(long)r * outs + first + o] + row[o];
        memcpy(out + (long)r * outs + first, row, sizeof(float) * valid);
    }
}

/* (cases past MAX_ROWS are never taken: run_tiles calls at most MAX_ROWS rows) */
#define ROWS_CASE(n, format) \
    case n: \
        if (whole) { \
            if (n <= WHOLE_ROWS) tile(x, in, w, next, format, bias, residual, valid, out, outs, n, VECTORS, 0); \
        } else if (n <= MAX_ROWS && part == 0) { \
            tile(x, in, w, next, format, bias, residual, valid, out, outs, n, PART_VECTORS, 0); \
        } else if (n <= MAX_ROWS && PARTS > 1) { \
            tile(x, in, w, next, format, bias, residual, valid, out, outs, n, PART_VECTORS, PARTS - 1); \
        } \
        break;
#define ROWS_CASES(format) \
    switch (rows) { \
        ROWS_CASE(1, format) ROWS_CASE(2, format) ROWS_CASE(3, format) ROWS_CASE(4, format) \
        ROWS_CASE(5, format) ROWS_CASE(6, format) ROWS_CASE(7, format) ROWS_CASE(8, format) \
        ROWS_CASE(9, format) ROWS_CASE(10, format) ROWS_CASE(11, format) ROWS_CASE(12, format) \
    }

/* (whole: a pass over the whole tile, of at most WHOLE_ROWS rows; else over part `part`, of at
   most MAX_ROWS) */
static void tile_rows(const float *x, int in, const void *w, const void *next, int format, const float *bias,
                      const float *residual, int valid, float *out, int outs, int rows, int whole, int part) {
    switch (format) {
    case FLOAT32: ROWS_CASES(FLOAT32) break;
    case HALF: ROWS_CASES(HALF) break;
    case Q4_1: ROWS_CASES(Q4_1) break;
    case Q8_0: ROWS_CASES(Q8_0) break;
    }
}

/* Bytes of one tile: TILE outputs' weights for all `in` inputs. */
static long tile_bytes(int in, int format) {
    switch (format) {
    case HALF: return (long)in * TILE * 2;
    case Q4_1: case Q8_0: return (long)(in / BLOCK) * block_bytes(format);
    default: return (long)in * TILE * 4;
    }
}

/* Tiles [from, to) over all rows: ROW_BLOCK rows at a time (their inputs stay in the core's cache
   while the tiles pass), and within those each tile a pass of rows at a time (the tile stays in
   the core's cache between them; a tile in blocks is widened to float32 once, into `scratch`
   [in][TILE], where it serves more than WIDEN_ONCE_ABOVE rows). */
static void run_tiles(const float *x, int rows, int in, const void *packed, int format, int outs, const float *bias,
                      const float *residual, float *out, int from, int to, float *scratch) {
    const long bytes = tile_bytes(in, format);
    for (int block = 0; block < rows; block += ROW_BLOCK) {
        const int block_end = block + ROW_BLOCK < rows ? block + ROW_BLOCK : rows;
        for (int t = from; t < to; t++) {
            const int first = t * TILE, valid = outs - first < TILE ? outs - first : TILE;
            const void *tile = (const char *)packed + t * bytes;
            const void *next = t + 1 < to ? (const char *)tile + bytes : 0;
            int tile_format = format;
#if HALF_WEIGHTS
            if (scratch && block_end - block > WIDEN_ONCE_ABOVE) {
                dequantize_tile(tile, next, in, format, scratch);
                tile = scratch;
                tile_format = FLOAT32;
                next = 0;
            }
#endif
            /* a few rows: passes over the whole tile (more independent sums a row); more: passes
               over each part (more rows a pass, the sums still in registers) */
            const int whole = block_end - block <= WHOLE_ROWS, parts = whole ? 1 : PARTS;
            const int most = whole ? WHOLE_ROWS : MAX_ROWS;
            /* the rows in as few passes as fit, of sizes as equal as can be (16 rows: 8 and 8, not
               12 and 4, whose short pass does little arithmetic for each weight it loads) */
            const int rows = block_end - block, passes = (rows + most - 1) / most;
            for (int part = 0; part < parts && part * PART < valid; part++)
                for (int p = 0, r = block; p < passes; p++) {
                    const int size = rows / passes + (p < rows % passes);
                    tile_rows(x + (long)r * in, in, tile, part == 0 && p == 0 ? next : 0, tile_format,
                              bias ? bias + first : 0, residual ? residual + (long)r * outs + first : 0, valid,
                              out + (long)r * outs + first, outs, size, whole, part);
                    r += size;
                }
        }
    }
}

/* This thread's scratch tile, [in][TILE] floats: kept between calls (a buffer allocated and freed
   each call cost more than the widening it saves: fresh pages to fault in), grown as needed; NULL
   if it cannot be allocated. */
static float *scratch_tile(int in) {
    static __thread float *tile;
    static __thread long capacity;
    if (in > capacity) {
        free(tile);
        tile = aligned_alloc(64, sizeof(float) * in * TILE); /* (a multiple of 64 bytes) whole cache lines, as a packed tile */
        capacity = tile ? in : 0;
    }
    return tile;
}

/* out = x @ w.T (+ bias) (+ residual), w packed as above in `format`. A call of enough work
   splits its tiles among up to `threads` threads of torch's OpenMP team. */
static void linear(const float *x, int rows, int in, const void *packed, int format, int outs, const float *bias,
                   const float *residual, float *out, int threads) {
    const int tiles = (outs + TILE - 1) / TILE;
    if (rows <= 0 || tiles <= 0) return;
    if (threads > tiles) threads = tiles;
    if (threads < 1 || (long)rows * in * outs < PARALLEL_FROM) threads = 1;
    /* blocks widened once a tile for calls of more than WIDEN_ONCE_ABOVE rows (an allocation
       failure leaves them widened per pass: slower, the same bits) */
    const int blocks = (format == Q4_1 || format == Q8_0) && rows > WIDEN_ONCE_ABOVE;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        run_tiles(x, rows, in, packed, format, outs, bias, residual, out, (int)((long)tiles * t / n),
                  (int)((long)tiles * (t + 1) / n), blocks ? scratch_tile(in) : 0);
    }
#else
    run_tiles(x, rows, in, packed, format, outs, bias, residual, out, 0, tiles, blocks ? scratch_tile(in) : 0);
#endif
}

void specdec_linear(const float *x, int rows, int in, const float *packed, int outs, const float *bias,
                    const float *residual, float *out, int threads) {
    linear(x, rows, in, packed, FLOAT32, outs, bias, residual, out, threads);
}

/* The same product on half-precision packed weights; does nothing where no half kernel was built. */
void specdec_linear_half(const float *x, int rows, int in, const void *packed, int outs, const float *bias,
                         const float *residual, float *out, int threads) {
    if (HALF_WEIGHTS) linear(x, rows, in, packed, HALF, outs, bias, residual, out, threads);
}

/* The same product on weights packed in GGML's blocks (`format` Q4_1 or Q8_0, `in` a multiple of
   BLOCK): the bits of the product on their float32 dequantization. Does nothing where no half
   kernel was built (the blocks' scales are half precision). */
void specdec_linear_blocks(const float *x, int rows, int in, const void *packed, int format, int outs,
                           const float *bias, const float *residual, float *out, int threads) {
    if (HALF_WEIGHTS && (format == Q4_1 || format == Q8_0) && in % BLOCK == 0)
        linear(x, rows, in, packed, format, outs, bias, residual, out, threads);
}

/* Whether specdec_linear_half computes (the CPU converts half precision: AVX-512, or AVX2 and F16C). */
int specdec_linear_half_built(void) { return HALF_WEIGHTS; }

/* The vector width this build computes in (16 floats with AVX-512, else 8) and the rows a pass
   over a tile holds in registers (logged at start-up by the services). */
int specdec_linear_lanes(void) { return LANES; }
int specdec_linear_rows_a_pass(void) { return MAX_ROWS; }

/* The tile width packed weights must have (cpu_kernels.py checks it against LINEAR_TILE). */
int specdec_linear_tile(void) { return TILE; }
