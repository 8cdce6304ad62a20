/* prototype: Q4_1 tile product, block-at-a-time L1 scratch + packed x, AVX2 */
#include <immintrin.h>
#include <string.h>
#include <stdlib.h>
#define LANES 8
#define TILE 32
#define BLOCK 32
#define QB (2 * TILE * 2 + BLOCK * TILE / 2)
typedef float vf __attribute__((vector_size(32)));
typedef int vi __attribute__((vector_size(32)));
static inline vf ldh(const unsigned short *p){ __m256 w=_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); vf v; memcpy(&v,&w,32); return v;}
static inline vi widen(const void *p){ __m256i w=_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); vi v; memcpy(&v,&w,32); return v;}
static inline vf splat(float x){ return (vf){x,x,x,x,x,x,x,x}; }
static inline vf ld(const float *p){ vf v; memcpy(&v,p,32); return v; }
static inline void st(float *p, vf v){ memcpy(p,&v,32); }

/* one block's weights [BLOCK][TILE] float32 */
static inline void deq_block(const unsigned char *blk, float *w) {
    const unsigned short *h = (const unsigned short *)blk;
    vf d[4], m[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) { d[c] = ldh(h + 8 * c); m[c] = ldh(h + TILE + 8 * c); }
    const unsigned char *codes = blk + 4 * TILE;
    for (int j = 0; j < BLOCK; j++) {
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const vi b = widen(codes + j * 16 + (c * 8) % 16);
            const vi q = c < 2 ? b & 15 : b >> 4;
            st(w + j * TILE + 8 * c, d[c] * __builtin_convertvector(q, vf) + m[c]);
        }
    }
}

static inline __attribute__((always_inline)) void pass(const float *xT, int R, int r0, const float *w, float *acc, int rows, int part, int i0) {
    vf s[6][2];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
 for (int c = 0; c < 2; c++) s[r][c] = ld(acc + (r0 + r) * TILE + part * 16 + 8 * c);
    for (int j = 0; j < BLOCK; j++) {
        const vf w0 = ld(w + j * TILE + part * 16), w1 = ld(w + j * TILE + part * 16 + 8);
        const float *xr = xT + (long)(i0 + j) * R + r0;
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) { const vf b = splat(xr[r]); s[r][0] += b * w0; s[r][1] += b * w1; }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
 for (int c = 0; c < 2; c++) st(acc + (r0 + r) * TILE + part * 16 + 8 * c, s[r][c]);
}
#define PASS(n) case n: pass(xT, R, r0, w, acc, n, part, i0); break;
void proto_linear(const float *x, int R, int in, const unsigned char *packed, int outs, float *out) {
    float *xT = aligned_alloc(64, sizeof(float) * R * in);
    for (int r = 0; r < R; r++) for (int i = 0; i < in; i++) xT[(long)i * R + r] = x[(long)r * in + i];
    float w[BLOCK * TILE] __attribute__((aligned(64)));
    float acc[96 * TILE] __attribute__((aligned(64)));
    const long tbytes = (long)(in / BLOCK) * QB;
    const int passes = (R + 5) / 6;
    for (int t = 0; t < outs / TILE; t++) {
        memset(acc, 0, sizeof(float) * R * TILE);
        for (int b = 0; b < in / BLOCK; b++) {
            deq_block(packed + t * tbytes + (long)b * QB, w);
            const int i0 = b * BLOCK;
            for (int part = 0; part < 2; part++)
                for (int p = 0, r0 = 0; p < passes; p++) {
                    const int size = R / passes + (p < R % passes);
                    switch (size) { PASS(1) PASS(2) PASS(3) PASS(4) PASS(5) PASS(6) }
                    r0 += size;
                }
        }
        for (int r = 0; r < R; r++) memcpy(out + (long)r * outs + t * TILE, acc + r * TILE, sizeof(float) * TILE);
    }
    free(xT);
}
