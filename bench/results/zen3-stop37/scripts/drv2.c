#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
void specdec_linear_blocks(const float *x, int rows, int in, const void *packed, int format, int outs,
                           const float *bias, const float *residual, float *out, int threads);
void proto_linear(const float *x, int R, int in, const unsigned char *packed, int outs, float *out);
static double now(){struct timespec a; clock_gettime(CLOCK_MONOTONIC,&a); return a.tv_sec+a.tv_nsec/1e9;}
int main(int argc, char **argv) {
    int rows = atoi(argv[1]), in = argc > 2 ? atoi(argv[2]) : 576, outs = argc > 3 ? atoi(argv[3]) : 3072;
    int reps = argc > 4 ? atoi(argv[4]) : 2000;
    long tiles = outs / 32, bytes_tile = (long)(in / 32) * (2 * 32 * 2 + 32 * 16);
    unsigned char *w = aligned_alloc(64, tiles * bytes_tile);
    for (long t = 0; t < tiles; t++)
        for (int b = 0; b < in / 32; b++) {
            unsigned char *blk = w + t * bytes_tile + (long)b * (2 * 32 * 2 + 32 * 16);
            unsigned short *h = (unsigned short *)blk;
            for (int j = 0; j < 64; j++) h[j] = 0x2000 + (rand() & 0x3ff);
            for (int j = 128; j < 128 + 512; j++) blk[j] = rand();
        }
    float *x = malloc(sizeof(float) * rows * in), *o1 = malloc(sizeof(float) * rows * outs), *o2 = malloc(sizeof(float) * rows * outs);
    for (int i = 0; i < rows * in; i++) x[i] = (rand() % 1000) / 1000.0f - 0.5f;
    specdec_linear_blocks(x, rows, in, w, 2, outs, 0, 0, o1, 1);
    proto_linear(x, rows, in, w, outs, o2);
    printf("rows %d same bits: %s  ", rows, memcmp(o1, o2, sizeof(float) * rows * outs) ? "NO" : "yes");
    double fm = (double)rows * in * outs / 8 * reps;
    for (int k = 0; k < 2; k++) {
    double a = now(); for (int r = 0; r < reps; r++) specdec_linear_blocks(x, rows, in, w, 2, outs, 0, 0, o1, 1);
    double b = now(); for (int r = 0; r < reps; r++) proto_linear(x, rows, in, w, outs, o2);
    double c = now();
    printf("cur %.2f  proto %.2f vFMA/ns | ", fm / (b - a) / 1e9, fm / (c - b) / 1e9);
    }
    printf("\n");
}
