/* Eight-float vectors and the few operations on them that the CPU kernels share
   (cpu_attention.c, cpu_layer.c). */

#ifndef SPECDEC_CPU_VECTOR_H
#define SPECDEC_CPU_VECTOR_H

#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

/* Lanes summed pairwise, in a fixed order. */
static inline float lanes_sum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* exp(x) for x <= 0, eight at once (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
   times 2^n); within a few ulp, and no libm (whose exp may differ between machines). */
static inline v8 exp8(v8 x) {
    const v8 lowest = splat(-87.0f);
    const v8i below = x < lowest; /* all ones where x < lowest */
    x = (v8)(((v8i)lowest & below) | ((v8i)x & ~below));
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
    const v8 r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500E-4f);
    p = p * r + splat(1.3981999507E-3f);
    p = p * r + splat(8.3334519073E-3f);
    p = p * r + splat(4.1665795894E-2f);
    p = p * r + splat(1.6666665459E-1f);
    p = p * r + splat(5.0000001201E-1f);
    p = (p * (r * r) + r) + splat(1.0f);
    const v8i scaled = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 two_n;
    memcpy(&two_n, &scaled, sizeof two_n);
    return p * two_n;
}

#endif
