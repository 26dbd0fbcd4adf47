/* The vector loops of kernels/cpu.c, compiled once per instruction set: cpu.c includes this file
 * with VB (the vector width in bytes) and LT_ISA (the suffix of this copy's names) defined, under
 * that instruction set's target pragma. Everything named here is renamed with the suffix. */
#define vf LT_FN(vf)
#define vi LT_FN(vi)
#define vu LT_FN(vu)
#define vh LT_FN(vh)
#define vd LT_FN(vd)
#define vl LT_FN(vl)
#define vf4 LT_FN(vf4)
#define vu4 LT_FN(vu4)
#define vi4 LT_FN(vi4)
#define vh4 LT_FN(vh4)
#define sel_f LT_FN(sel_f)
#define sel_u LT_FN(sel_u)
#define loadf LT_FN(loadf)
#define roundh LT_FN(roundh)
#define block_absmax LT_FN(block_absmax)
#define roundtrip_lanes LT_FN(roundtrip_lanes)
#define loadd LT_FN(loadd)
#define checkd LT_FN(checkd)
#define parity_rows LT_FN(parity_rows)

/* Vectors of VB bytes: NF float32 or ND float64 lanes (GCC's vector extensions, one register
 * each on the ISA this copy is compiled for). Comparisons give lanes of all ones or zeros;
 * selects are bitwise. The types of ND lanes of 16 and 32 bits (vh4, vu4, vi4, vf4) hold what
 * one float64 vector is converted from. */
#define NF (VB / 4)
#define ND (VB / 8)
typedef float vf __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));
typedef double vd __attribute__((vector_size(VB)));
typedef int64_t vl __attribute__((vector_size(VB)));
typedef float vf4 __attribute__((vector_size(VB / 2)));
typedef uint32_t vu4 __attribute__((vector_size(VB / 2)));
typedef int32_t vi4 __attribute__((vector_size(VB / 2)));
typedef uint16_t vh4 __attribute__((vector_size(VB / 4)));
#if VB == 64 /* a 16-entry table in one register, or two */
#define TABLE(T, q) __builtin_shuffle((T)[0], (q))
#else
#define TABLE(T, q) __builtin_shuffle((T)[0], (T)[1], (q))
#endif

LT_INLINE vf sel_f(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); } /* m ? a : b */
LT_INLINE vu sel_u(vi m, vu a, vu b) { return ((vu)m & a) | (~(vu)m & b); }

/* NF elements of dt at p as float32 (exactly) */
LT_INLINE vf loadf(const void *p, int dt) {
    if (dt == DT_F32) { vf x; memcpy(&x, p, sizeof x); return x; }
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu);
    if (dt == DT_BF16) return (vf)(u << 16);
    return (vf)LT_HALF_BITS(u, vu, vi, vf);
}

/* finite float32 lanes -> bfloat16 or float16 bits (rounded to nearest even; float16 overflow
 * gives Inf, as numpy's cast), and the rounded values as float32 in *back */
LT_INLINE vh roundh(vf v, int dt, vf *back) {
    vu x = (vu)v;
    if (dt == DT_BF16) {
        vu b = (x + (((x >> 16) & 1u) + 0x7FFFu)) >> 16; /* bnb._round_into's integer formula */
        *back = (vf)(b << 16);
        return __builtin_convertvector(b, vh);
    }
    /* float16. Normal results: rebias, round the 13 dropped bits to nearest even (a carry may
     * reach Inf); below float16's smallest normal the float adder rounds: |v| + 0.5, whose ulp is
     * float16's 2^-24 */
    vu sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    const float magic = u2f((127u - 14u + 23u - 10u) << 23);
    vu normal = (a - ((127u - 15u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    vu subnormal = (vu)((vf)a + magic) - f2u(magic);
    vu h = sel_u((vi)a >= (int32_t)((127u + 16u) << 23), (vu){} + 0x7C00u,
                 sel_u((vi)a < (int32_t)((127u - 14u) << 23), subnormal, normal));
    h |= sign;
    *back = (vf)LT_HALF_BITS(h, vu, vi, vf);
    return __builtin_convertvector(h, vh);
}

/* ---- bitsandbytes' 4-bit round trip ---------------------------------------------------------- */

/* The absmax of the nb elements at p, from the bits (their integer order is the values' order), a
 * short block's clamped to 1e-38 as bitsandbytes stores it (bnb.absmax_bits), into *a. Returns 1
 * where a value is not finite (Inf and NaN lie above every finite value), else 0. */
LT_INLINE int block_absmax(const void *p, int dt, int64_t nb, int short_block, float *a) {
    uint32_t m = 0;
    if (dt == DT_F32) {
        const uint32_t *q = (const uint32_t *)p;
        for (int64_t e = 0; e < nb; e++) { uint32_t x = q[e] & 0x7FFFFFFFu; m = x > m ? x : m; }
    } else {
        const uint16_t *q = (const uint16_t *)p;
        for (int64_t e = 0; e < nb; e++) { uint32_t x = q[e] & 0x7FFFu; m = x > m ? x : m; }
    }
    if (m >= (dt == DT_F32 ? 0x7F800000u : dt == DT_F16 ? 0x7C00u : 0x7F80u)) return 1;
    float v = dt == DT_BF16 ? u2f(m << 16) : dt == DT_F16 ? half_to_float((uint16_t)m) : u2f(m);
    *a = short_block && !(v > 1e-38f) ? 1e-38f : v;
    return 0;
}

/* nb (< NF in the last chunk of a tensor) elements of a block: scaled (x * recip, or x / absmax in
 * a short last block, as quantize_4bit), mapped to the value of the code they quantize to (the
 * count of midpoints below the scaled value, as searchsorted(side="left")), times the block's
 * scale, rounded to dt and written to o; the squares added into ws, qs (float32 lanes, as numpy's
 * float32 dot products). V, B: the 16 code values and the 15 midpoints, NF to a vector. */
LT_INLINE void roundtrip_lanes(const void *p, int dt, int64_t nb, int partial, float absmax, float recip,
                               float scale, const vf *V, const vf *B, int add_zero, void *o, vf *ws, vf *qs) {
    size_t item = dt == DT_F32 ? 4 : 2;
    vf x;
    if (nb == NF) {
        x = loadf(p, dt);
    } else { /* a tensor's last elements: through a zero-padded copy */
        unsigned char pad[sizeof(vf)] = {0};
        memcpy(pad, p, (size_t)nb * item);
        x = loadf(pad, dt);
    }
    vf s = partial ? x / absmax : x * recip;
    /* q by binary search, each step's midpoint read out of the two table registers by a lane
     * permutation; then the value of code q the same way. A midpoint below s moves q up. */
    vi q = {0};
    q += (vi)(TABLE(B, q + 7) < s) & 8;
    q += (vi)(TABLE(B, q + 3) < s) & 4;
    q += (vi)(TABLE(B, q + 1) < s) & 2;
    q += (vi)(TABLE(B, q) < s) & 1;
    vf v = TABLE(V, q);
    v = v * scale;
    if (add_zero) v = v + 0.0f; /* -0 + 0 = +0 */
    vf r;
    if (dt == DT_F32) { /* a constant size but in the tail: no call to memcpy in the loop */
        r = v;
        if (nb == NF) memcpy(o, &v, sizeof v); else memcpy(o, &v, (size_t)nb * 4);
    } else {
        vh h = roundh(v, dt, &r);
        if (nb == NF) memcpy(o, &h, sizeof h); else memcpy(o, &h, (size_t)nb * 2);
    }
    vf d = x - r;
    *ws += x * x; /* padded lanes are zeros on both sides */
    *qs += d * d;
}

/* raw: n elements of dt (BF16, F16, F32), whole blocks of bs (a multiple of NF) but for a tensor's
 * last; vals: the 16 code values in sorted order, bnds: the 15 midpoints; scale: the dequantization
 * factor of each block, or NULL for the block's own absmax; absmax: each block's absmax, or NULL to
 * compute it (the last short block's clamped to 1e-38 as bitsandbytes stores it); out: n elements
 * of dt; sums: NULL, or where ||W||^2 and ||W - dequant(quant(W))||^2 are written (float32 sums of
 * each block's squares, added in float64). Returns 0, or 1 where a block's values, absmax or scale
 * are not finite (out is then partly written), 2 for arguments it does not take. */
static int LT_FN(roundtrip)(const void *raw, int dt, int64_t n, int64_t bs, const float *vals,
                                     const float *bnds, const float *scale, const float *absmax, int add_zero,
                                     void *out, double *sums) {
    if (bs <= 0 || bs > MAX_BLOCK || bs % NF || (dt != DT_BF16 && dt != DT_F16 && dt != DT_F32)) return 2;
    vf V[16 / NF], B[16 / NF]; /* the tables, a value per lane (the 16th midpoint lane is never read) */
    for (int k = 0; k < 16; k++) V[k / NF][k % NF] = vals[k], B[k / NF][k % NF] = bnds[k < 15 ? k : 14];
    const size_t item = dt == DT_F32 ? 4 : 2;
    vd w_sum = {0}, q_sum = {0};
    for (int64_t b = 0, e0 = 0; e0 < n; b++, e0 += bs) {
        const int64_t nb = n - e0 < bs ? n - e0 : bs;
        const int partial = nb < bs;
        const unsigned char *p = (const unsigned char *)raw + e0 * item;
        unsigned char *o = (unsigned char *)out + e0 * item;
        float a;
        if (block_absmax(p, dt, nb, partial, &a)) return 1; /* the values' finiteness, absmax given or not */
        if (absmax) a = absmax[b];
        const float sc = scale ? scale[b] : a;
        if (!isfinite(a) || !isfinite(sc) || (partial && !(a > 0))) return 1; /* x / 0: numpy decides */
        const float recip = 1.0f / (a > 1e-38f ? a : 1e-38f);
        vf ws = {0}, qs = {0};
        /* one specialization per dtype and case: no test inside the loop */
#define LT_LOOP(DT, PARTIAL, ZERO)                                                                 \
    for (int64_t e = 0; e < nb; e += NF)                                                           \
        roundtrip_lanes(p + e * item, DT, nb - e < NF ? nb - e : NF, PARTIAL, a, recip, sc, V, B, ZERO, \
                        o + e * item, &ws, &qs)
#define LT_DT(DT)                                   \
    do {                                            \
        if (partial) LT_LOOP(DT, 1, add_zero);      \
        else if (add_zero) LT_LOOP(DT, 0, 1);       \
        else LT_LOOP(DT, 0, 0);                     \
    } while (0)
        if (dt == DT_BF16) LT_DT(DT_BF16);
        else if (dt == DT_F16) LT_DT(DT_F16);
        else LT_DT(DT_F32);
#undef LT_DT
#undef LT_LOOP
        if (sums) { /* the block's float32 lanes added into float64 lanes */
            vf4 h[4];
            memcpy(h, &ws, sizeof ws);
            memcpy(h + 2, &qs, sizeof qs);
            w_sum += __builtin_convertvector(h[0], vd) + __builtin_convertvector(h[1], vd);
            q_sum += __builtin_convertvector(h[2], vd) + __builtin_convertvector(h[3], vd);
        }
    }
    if (sums) {
        sums[0] = sums[1] = 0;
        for (int l = 0; l < ND; l++) sums[0] += w_sum[l], sums[1] += q_sum[l];
    }
    return 0;
}

/* raw: n elements of dt (BF16, F16, F32); out: the absmax of each block of bs (the last one may be
 * short: clamped to 1e-38, as bitsandbytes stores it), as bnb.absmax_bits computes it. Returns 0,
 * 1 where a block holds a value not finite (out then partly written), 2 for arguments it does
 * not take. */
static int LT_FN(absmax)(const void *raw, int dt, int64_t n, int64_t bs, float *out) {
    if (bs <= 0 || (dt != DT_BF16 && dt != DT_F16 && dt != DT_F32)) return 2;
    const size_t item = dt == DT_F32 ? 4 : 2;
    for (int64_t b = 0, e0 = 0; e0 < n; b++, e0 += bs) {
        const int64_t nb = n - e0 < bs ? n - e0 : bs;
        if (block_absmax((const unsigned char *)raw + e0 * item, dt, nb, nb < bs, out + b)) return 1;
    }
    return 0;
}

/* ---- parity's first pass -------------------------------------------------------------------- */


/* ND elements of dt at p as float64 (exactly) */
LT_INLINE vd loadd(const void *p, int dt) {
    if (dt == DT_F64) { vd x; memcpy(&x, p, sizeof x); return x; }
    vf4 f;
    if (dt == DT_F32) {
        memcpy(&f, p, sizeof f);
    } else {
        vh4 h;
        memcpy(&h, p, sizeof h);
        vu4 u = __builtin_convertvector(h, vu4);
        f = dt == DT_BF16 ? (vf4)(u << 16) : (vf4)LT_HALF_BITS(u, vu4, vi4, vf4);
    }
    return __builtin_convertvector(f, vd);
}

/* The check of one row's ND columns at element e: X = acc + W, err = |M - X|, ulp(X) =
 * 2^floor(log2|X|) (at least 2^emin); the maxima of err and of err / ulp(X) (a power of two: the
 * product with its inverse is exact) into *mabs, *mrat; lanes where err is not finite set in *bad.
 * Every comparison is of float64 lanes with float64 lanes (a comparison that AVX2 and AVX-512
 * both keep in vector registers). */
LT_INLINE void checkd(vd acc, const void *w, int wdt, const void *m, int mdt, int64_t e, vd emin,
                      vd *mabs, vd *mrat, vl *bad) {
    const size_t wi = wdt == DT_F64 ? 8 : wdt == DT_F32 ? 4 : 2;
    const vd inf = (vd){} + INFINITY, top = (vd){} + 0x1p1023;
    vd x = acc + loadd((const unsigned char *)w + e * wi, wdt);
    vd d = loadd((const unsigned char *)m + e * 2, mdt) - x;
    vd err = (vd)((vl)d & 0x7FFFFFFFFFFFFFFFll);
    vd ulp = (vd)((vl)x & 0x7FF0000000000000ll);
    vl small = (vl)(ulp < emin);
    ulp = (vd)((small & (vl)emin) | (~small & (vl)ulp));
    vd ratio = err * (vd)((2046ll << 52) - (vl)ulp);
    /* NaN compares false; |X| at 2^1023 or above has no normal inverse ulp: numpy decides both */
    *bad |= ~(vl)(err < inf) | ~(vl)(ulp < top);
    vl more = (vl)(err > *mabs);
    *mabs = (vd)((more & (vl)err) | (~more & (vl)*mabs));
    more = (vl)(ratio > *mrat);
    *mrat = (vd)((more & (vl)ratio) | (~more & (vl)*mrat));
}

/* NR rows (r0 on) of a block, columns [0, c8) in steps of 2·ND: acc = L[r] @ R[:, c:c+2·ND] in
 * float64 (2·NR independent sums: the adds' latency hidden), then checkd of each half. */
LT_INLINE void parity_rows(
    const void *w, int wdt, const void *m, int mdt, const double *left, const double *right, int64_t r0,
    int NR, int64_t c8, int64_t cols, int64_t R, vd emin, vd *mabs, vd *mrat, vl *bad) {
    for (int64_t c = 0; c < c8; c += 2 * ND) {
        vd acc[ROWS][2];
        for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = (vd){0};
        for (int64_t k = 0; k < R; k++) {
            vd r0v, r1v;
            memcpy(&r0v, right + k * cols + c, sizeof r0v);
            memcpy(&r1v, right + k * cols + c + ND, sizeof r1v);
            for (int r = 0; r < NR; r++) {
                double l = left[(r0 + r) * R + k];
                acc[r][0] += l * r0v;
                acc[r][1] += l * r1v;
            }
        }
        for (int r = 0; r < NR; r++) {
            int64_t e = (r0 + r) * cols + c;
            checkd(acc[r][0], w, wdt, m, mdt, e, emin, mabs, mrat, bad);
            checkd(acc[r][1], w, wdt, m, mdt, e + ND, emin, mabs, mrat, bad);
        }
    }
}

/* w: rows x cols of wdt (BF16, F16, F32, F64), the base's rows; m: the merged rows, mdt (BF16,
 * F16); left: rows x R, right: R x cols, float64, C order; emin: the smallest normal exponent of
 * mdt; res: max |M - X| and max |M - X| / ulp(X) in ulps of X (2^(floor(log2|X|) - mant)).
 * Returns 0, 1 where a value is not finite (res then unset), 2 for arguments it does not take. */
static int LT_FN(parity_block)(const void *w, int wdt, const void *m, int mdt, const double *left,
                                        const double *right, int64_t rows, int64_t cols, int64_t R, int emin,
                                        int mant, double *res) {
    if ((mdt != DT_BF16 && mdt != DT_F16) || wdt < DT_BF16 || wdt > DT_F64) return 2;
    const uint64_t emin_bits = (uint64_t)(emin + 1023) << 52;
    const vd emin_v = (vd){} + u2d(emin_bits);
    const int64_t c8 = cols - cols % (2 * ND); /* the columns the vector loop takes */
    vd mabs = {0}, mrat = {0};
    vl badv = {0};
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        int nr = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        /* one specialization per pair of dtypes and row count: the loads and loops inline */
#define LT_NR(WD, MD)                                                                                      \
    do {                                                                                                   \
        if (nr == ROWS)                                                                                    \
            parity_rows(w, WD, m, MD, left, right, r0, ROWS, c8, cols, R, emin_v, &mabs, &mrat, &badv);   \
        else                                                                                               \
            for (int r = 0; r < nr; r++)                                                                   \
                parity_rows(w, WD, m, MD, left, right, r0 + r, 1, c8, cols, R, emin_v, &mabs, &mrat, &badv); \
    } while (0)
#define LT_W(MD)                                  \
    do {                                          \
        if (wdt == DT_BF16) LT_NR(DT_BF16, MD);   \
        else if (wdt == DT_F16) LT_NR(DT_F16, MD);\
        else if (wdt == DT_F32) LT_NR(DT_F32, MD);\
        else LT_NR(DT_F64, MD);                   \
    } while (0)
        if (mdt == DT_BF16) LT_W(DT_BF16);
        else LT_W(DT_F16);
#undef LT_W
#undef LT_NR
    }
    double a = 0, q = 0;
    int bad = 0;
    for (int l = 0; l < ND; l++) {
        bad |= badv[l] != 0;
        a = mabs[l] > a ? mabs[l] : a;
        q = mrat[l] > q ? mrat[l] : q;
    }
    if (c8 < cols) parity_tail(w, wdt, m, mdt, left, right, 0, rows, c8, cols, R, emin_bits, &a, &q, &bad);
    if (bad) return 1;
    res[0] = a;
    res[1] = q * ldexp(1.0, mant);
    return 0;
}

#undef vf
#undef vi
#undef vu
#undef vh
#undef vd
#undef vl
#undef vf4
#undef vu4
#undef vi4
#undef vh4
#undef sel_f
#undef sel_u
#undef loadf
#undef roundh
#undef block_absmax
#undef roundtrip_lanes
#undef loadd
#undef checkd
#undef parity_rows
#undef NF
#undef ND
#undef TABLE
