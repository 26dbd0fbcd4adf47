/* CPU loops in C, installed as loratool.kernels._cpu (an optional extension: where it does not
 * build, loratool computes the same results in numpy). Called through ctypes from
 * loratool.kernels.cpu, which holds the numpy-facing wrappers; ctypes releases the GIL for each
 * call, so the merge's and parity's worker threads run these loops in parallel.
 *
 *   lt_roundtrip     bitsandbytes' 4-bit round trip dequant(quant(W)) of a run of whole blocks,
 *                    bit for bit as loratool.quant.bnb computes it in numpy (its reference), with
 *                    the report's sums ||W||^2 and ||W - dequant(quant(W))||^2.
 *   lt_absmax        the absmax of each 4-bit block, from the bits (bnb.absmax_bits): double
 *                    quantization's pass over a tensor before its round trip.
 *   lt_kth_largest_abs  the threshold of compose's magnitude pruning (TIES), by a radix select
 *                    where numpy partitions: the same value, and the counts its ties need.
 *   lt_parity_block  parity's first pass over a row block: X = W + L @ R in float64, and
 *                    max |M - X| and max |M - X| / ulp(X) (loratool.merge.paritystream).
 *
 * Both return nonzero where a value is not finite (NaN, Inf): the caller then computes that
 * block in numpy, which defines what such values give. Floating-point expressions are evaluated
 * as written (the build passes -ffp-contract=off: no fused multiply-adds), in the order numpy
 * evaluates them, so that every rounded value is the reference's.
 *
 * The loops (cpu_body.h) are written once in GCC's vector extensions and compiled, on x86-64 with
 * GCC, for x86-64-v4 (AVX-512, 64-byte vectors) and x86-64-v3 (AVX2, 32-byte vectors); the entry
 * points pick the best copy the CPU runs (lt_isa; lt_cap_isa lowers it, for tests). Elsewhere (a
 * CPU with neither, another architecture, another compiler) they return 2 and numpy computes:
 * the same loops built for SSE2 alone ran 7 times slower than numpy here, and no other target has
 * been measured.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LT_EXPORT __attribute__((visibility("default")))
#define LT_INLINE static inline __attribute__((always_inline))

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2, DT_F64 = 3 };

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
static inline double u2d(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

/* float16 bits -> float32, exactly (Inf and NaN kept); each case computed, one selected (no
 * branch: the loops around vectorize) */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t special = 0x7F800000u | ((em & 0x3FFu) << 13);
    uint32_t normal = (em << 13) + ((127u - 15u) << 23);
    uint32_t subnormal = f2u((float)(int32_t)em * 0x1p-24f); /* em * 2^-24, exact (or zero) */
    uint32_t bits = em >= 0x7C00u ? special : em >= 0x0400u ? normal : subnormal;
    return u2f(bits | sign);
}

static inline __attribute__((unused)) float load_f32(const void *p, int dt, int64_t i) {
    if (dt == DT_BF16) return u2f((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dt == DT_F16) return half_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

#define MAX_BLOCK 4096 /* the largest quantization block (bnb.BLOCKSIZES) */
#define ROWS 4          /* parity: rows computed together, each column of R loaded once for four */

/* float16 bits (in 32-bit lanes) -> float32 bits, exactly: each case computed, one selected */
#define LT_HALF_BITS(U, VU, VI, VF)                                                             \
    ({                                                                                          \
        VU sign_ = ((U) & 0x8000u) << 16, em_ = (U) & 0x7FFFu;                                   \
        VU special_ = 0x7F800000u | ((em_ & 0x3FFu) << 13);                                      \
        VU normal_ = (em_ << 13) + ((127u - 15u) << 23);                                         \
        VU sub_ = (VU)(__builtin_convertvector((VI)em_, VF) * 0x1p-24f); /* em * 2^-24, exact */ \
        VU big_ = (VU)((VI)em_ >= 0x7C00), norm_ = (VU)((VI)em_ >= 0x0400);                    \
        (big_ & special_) | (~big_ & ((norm_ & normal_) | (~norm_ & sub_))) | sign_;            \
    })

/* Columns [c8, cols) of rows [r0, r1): the same as parity_rows, one element at a time. */
static inline __attribute__((unused)) void parity_tail(const void *w, int wdt, const void *m, int mdt, const double *left,
                               const double *right, int64_t r0, int64_t r1, int64_t c8, int64_t cols, int64_t R,
                               uint64_t emin_bits, double *mabs, double *mrat, int *bad) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c8; c < cols; c++) {
            double acc = 0;
            for (int64_t k = 0; k < R; k++) acc += left[r * R + k] * right[k * cols + c];
            int64_t e = r * cols + c;
            double wv = wdt == DT_F64 ? ((const double *)w)[e] : (double)load_f32(w, wdt, e);
            double x = acc + wv, err = fabs((double)load_f32(m, mdt, e) - x);
            uint64_t u = d2u(x) & 0x7FF0000000000000ull;
            u = u > emin_bits ? u : emin_bits;
            double ratio = err * u2d((2046ull << 52) - u);
            *bad |= !(err < INFINITY) || u >= (2046ull << 52); /* as checkd: numpy decides */
            *mabs = err > *mabs ? err : *mabs;
            *mrat = ratio > *mrat ? ratio : *mrat;
        }
}

/* ---- the k-th largest magnitude (compose's magnitude pruning) --------------------------------- */

/* t: n float32; k in [1, n]. The k-th largest |t| (the value numpy's partition puts at ascending
 * index n - k, NaN above Inf) as its bits, and how many |t| lie above it and equal it: a radix
 * select on the bits of |t|, whose integer order is the values' order, by two histograms of 16
 * bits each (the top halves, then the bottom halves of the elements in the top half's bin). */
LT_EXPORT int lt_kth_largest_abs(const float *t, int64_t n, int64_t k, uint32_t *thr, int64_t *above,
                                 int64_t *equal) {
    if (k < 1 || k > n || n >= ((int64_t)1 << 32)) return 2;
    const uint32_t *u = (const uint32_t *)t;
    uint32_t *hist = calloc(1 << 16, sizeof *hist);
    if (!hist) return 2;
    for (int64_t e = 0; e < n; e++) hist[(u[e] & 0x7FFFFFFFu) >> 16]++;
    int64_t gt = 0; /* elements in bins above the one being looked at */
    uint32_t top = 0x7FFF;
    while (gt + hist[top] < k) gt += hist[top--];
    memset(hist, 0, (1 << 16) * sizeof *hist);
    for (int64_t e = 0; e < n; e++) {
        uint32_t a = u[e] & 0x7FFFFFFFu;
        if (a >> 16 == top) hist[a & 0xFFFFu]++;
    }
    uint32_t low = 0xFFFF;
    while (gt + hist[low] < k) gt += hist[low--];
    *thr = top << 16 | low;
    *above = gt;
    *equal = hist[low];
    free(hist);
    return 0;
}

#define LT_CAT2(a, b) a##_##b
#define LT_CAT(a, b) LT_CAT2(a, b)
#define LT_FN(name) LT_CAT(name, LT_ISA)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LT_X86 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define VB 64
#define LT_ISA v4
#include "cpu_body.h"
#undef VB
#undef LT_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define VB 32
#define LT_ISA v3
#include "cpu_body.h"
#undef VB
#undef LT_ISA
#pragma GCC pop_options
#endif

/* ---- entry points --------------------------------------------------------------------------- */

static int isa_cap = 2;

/* The instruction set the entry points use: 2 x86-64-v4, 1 x86-64-v3, 0 none (they return 2). */
LT_EXPORT int lt_isa(void) {
#ifdef LT_X86
    __builtin_cpu_init();
    int level = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
    return level < isa_cap ? level : isa_cap;
#else
    return 0;
#endif
}

/* Caps the instruction set at `cap` (tests run each copy the CPU can); returns the one now used. */
LT_EXPORT int lt_cap_isa(int cap) {
    isa_cap = cap;
    return lt_isa();
}

LT_EXPORT int lt_roundtrip(const void *raw, int dt, int64_t n, int64_t bs, const float *vals, const float *bnds,
                           const float *scale, const float *absmax, int add_zero, void *out, double *sums) {
#ifdef LT_X86
    switch (lt_isa()) {
    case 2: return roundtrip_v4(raw, dt, n, bs, vals, bnds, scale, absmax, add_zero, out, sums);
    case 1: return roundtrip_v3(raw, dt, n, bs, vals, bnds, scale, absmax, add_zero, out, sums);
    default: return 2;
    }
#else
    (void)raw, (void)dt, (void)n, (void)bs, (void)vals, (void)bnds, (void)scale, (void)absmax, (void)add_zero;
    (void)out, (void)sums;
    return 2;
#endif
}

LT_EXPORT int lt_absmax(const void *raw, int dt, int64_t n, int64_t bs, float *out) {
#ifdef LT_X86
    switch (lt_isa()) {
    case 2: return absmax_v4(raw, dt, n, bs, out);
    case 1: return absmax_v3(raw, dt, n, bs, out);
    default: return 2;
    }
#else
    (void)raw, (void)dt, (void)n, (void)bs, (void)out;
    return 2;
#endif
}

LT_EXPORT int lt_parity_block(const void *w, int wdt, const void *m, int mdt, const double *left,
                              const double *right, int64_t rows, int64_t cols, int64_t R, int emin, int mant,
                              double *res) {
#ifdef LT_X86
    switch (lt_isa()) {
    case 2: return parity_block_v4(w, wdt, m, mdt, left, right, rows, cols, R, emin, mant, res);
    case 1: return parity_block_v3(w, wdt, m, mdt, left, right, rows, cols, R, emin, mant, res);
    default: return 2;
    }
#else
    (void)w, (void)wdt, (void)m, (void)mdt, (void)left, (void)right, (void)rows, (void)cols, (void)R, (void)emin;
    (void)mant, (void)res;
    return 2;
#endif
}

/* An importable module (nothing in it): loratool loads this file through ctypes. */
static struct PyModuleDef lt_module = {PyModuleDef_HEAD_INIT, "_cpu", "loratool's C loops (see cpu.py)", -1, NULL};
PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&lt_module); }
