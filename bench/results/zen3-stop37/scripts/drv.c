#include <stdio.h>
#include <stdlib.h>
#include <time.h>
void specdec_linear_blocks(const float *x, int rows, int in, const void *packed, int format, int outs,
                           const float *bias, const float *residual, float *out, int threads);
int main(int argc, char **argv) {
    int rows = atoi(argv[1]), in = argc > 2 ? atoi(argv[2]) : 576, outs = argc > 3 ? atoi(argv[3]) : 3072;
    int reps = argc > 4 ? atoi(argv[4]) : 2000, layers = argc > 5 ? atoi(argv[5]) : 1;
    long tiles = outs / 32, bytes_tile = (long)(in / 32) * (2 * 32 * 2 + 32 * 16);
    unsigned char *w = aligned_alloc(64, tiles * bytes_tile * layers);
    for (long t = 0; t < tiles * layers; t++)
        for (int b = 0; b < in / 32; b++) {
            unsigned char *blk = w + t * bytes_tile + (long)b * (2 * 32 * 2 + 32 * 16);
            unsigned short *h = (unsigned short *)blk;
            for (int j = 0; j < 64; j++) h[j] = 0x2000 + (rand() & 0x3ff);
            for (int j = 128; j < 128 + 512; j++) blk[j] = rand();
        }
    float *x = malloc(sizeof(float) * rows * in), *out = malloc(sizeof(float) * rows * outs);
    for (int i = 0; i < rows * in; i++) x[i] = (rand() % 1000) / 1000.0f - 0.5f;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < reps; r++)
        specdec_linear_blocks(x, rows, in, w + (long)(r % layers) * tiles * bytes_tile, 2, outs, 0, 0, out, 1);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    double fmas = (double)rows * in * outs * reps / 8;
    printf("rows %d: %.3f us/call, %.2f vector FMAs/ns, out[0]=%g\n", rows, s / reps * 1e6, fmas / s / 1e9, out[0]);
}
