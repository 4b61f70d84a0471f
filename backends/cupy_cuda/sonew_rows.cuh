// SONew's per-row math (included by sonew.cu): the functions every SONew kernel and the host
// harness call for one row j, as `__host__ __device__` templates in `arrayopt::sonew`.
//
// Same arithmetic, in the same order, as the Numba backend's SONew step (itself the order of
// SONew.flat_leaf and arrayopt/sonew/math.py); every float operation is an `ieee::` function
// (rn_ops.cuh). Layout of `band`, `psi`, `norms`, `counts` and `rowmax`: see sonew.cu.

#ifndef ARRAYOPT_SONEW_ROWS_CUH
#define ARRAYOPT_SONEW_ROWS_CUH

#include "rn_ops.cuh"

namespace arrayopt {
namespace sonew {

using namespace ieee;

// graft codes: arrayopt/sonew/step.py GRAFT_CODES (a test checks that they agree)
enum { GRAFT_NONE = 0, GRAFT_ADAM = 1, GRAFT_SGD = 2, GRAFT_MOMENTUM = 3,
       GRAFT_RMSPROP_NORMALIZED = 4 };

// ------------------------------------------------------------------ per-row math

// Pass 1 for row j: m_j, band[j, 0..b]; returns row j's term of the graft target norm².
template <typename T>
__host__ __device__ inline double stats_row(long long j, const T* g, T* m, T* band, long long n,
                                            int b, T omb1, T b2, T omb2, T bc1, T bc2,
                                            T graft_eps, int graft) {
    const T gj = g[j];
    const T mj = add(m[j], mul(omb1, sub(gj, m[j])));
    m[j] = mj;
    T* row = band + j * (long long)(b + 1);
    for (int k = 0; k <= b; ++k) {
        if (j + k < n)
            row[k] = add(mul(row[k], b2), mul(omb2, mul(gj, g[j + k])));
        else
            row[k] = mul(row[k], b2);
    }
    double a;
    if (graft == GRAFT_ADAM) {
        a = to_double(div(div(mj, bc1), add(ieee::sqrt(div(row[0], bc2)), graft_eps)));
    } else if (graft == GRAFT_SGD) {
        a = to_double(gj);
    } else if (graft == GRAFT_MOMENTUM) {
        a = to_double(div(mj, bc1));
    } else {
        return 0.0;
    }
    return mul(a, a);
}

// Σ_i |Ĥ_ji| over row j of the band (Ĥ = band / bc2), in Numba's order.
template <typename T>
__host__ __device__ inline T rowsum(long long j, const T* band, long long n, int b, T bc2) {
    const long long w = b + 1;
    T r = div(band[j * w], bc2);
    for (int k = 1; k <= b; ++k)
        if (j + k < n) r = add(r, absval(div(band[j * w + k], bc2)));
    for (int k = 1; k <= b; ++k)
        if (j - k >= 0) r = add(r, absval(div(band[(j - k) * w + k], bc2)));
    return r;
}

// ε_eff = max(ε·max_rowsum, ε_min) (relative) or ε (absolute); Python's max(a, b) keeps a
// unless b > a.
template <typename T>
__host__ __device__ inline T eps_effective(const T* rowmax, T eps, T eps_min, int relative) {
    if (!relative) return eps;
    const T e = mul(eps, rowmax[0]);
    return gt(eps_min, e) ? eps_min : e;
}

// Tridiagonal row i: ψ_i = w, s_i (edge removal: s <= τ H_ii drops edge (i, i+1)) and
// t_i = (m̂_i - ψ_i m̂_{i+1}) / s_i.
template <typename T>
struct TriRow {
    T w, s, t;
    int removed;
};

template <typename T>
__host__ __device__ inline TriRow<T> tri_row(long long i, const T* m, const T* band, long long n,
                                             T bc1, T bc2, T eps_eff, T tau) {
    TriRow<T> r;
    const T d0 = add(div(band[2 * i], bc2), eps_eff);
    const T mh = div(m[i], bc1);
    r.removed = 0;
    if (i + 1 < n) {
        const T z = div(band[2 * i + 1], bc2);
        const T dn = add(div(band[2 * i + 2], bc2), eps_eff);
        T w = div(z, dn);
        T s = sub(d0, mul(z, w));
        if (!gt(s, mul(tau, d0))) {
            w = mul(w, T(0));
            s = d0;
            r.removed = 1;
        }
        r.w = w;
        r.s = s;
        r.t = div(sub(mh, mul(w, div(m[i + 1], bc1))), s);
    } else {
        r.w = T(0);
        r.s = d0;
        r.t = div(mh, d0);
    }
    return r;
}

// Row j's result y: p_j <- p_j + (-lr)(y + λ p_j) (no graft), or u_j = y; returns y² (the
// ‖u‖² term) when u is written.
template <typename T>
__host__ __device__ inline double write_row(long long j, T y, T* p, T* u, T neg_lr, T wd,
                                            int write_p) {
    if (write_p) {
        const T pj = p[j];
        const T upd = nonzero(wd) ? mul(neg_lr, add(y, mul(wd, pj))) : mul(neg_lr, y);
        p[j] = add(pj, upd);
        return 0.0;
    }
    u[j] = y;
    const double yd = to_double(y);
    return mul(yd, yd);
}

// Tridiagonal pass for row j: y_j = t_j - ψ_{j-1} t_{j-1}. Adds row j's dropped edge to
// *removed.
template <typename T>
__host__ __device__ inline T tri_y(long long j, const T* m, const T* band, long long n, T bc1,
                                   T bc2, T eps_eff, T tau, int* removed) {
    T psi_prev = T(0), t_prev = T(0);
    if (j > 0) {
        const TriRow<T> prev = tri_row(j - 1, m, band, n, bc1, bc2, eps_eff, tau);
        psi_prev = prev.w;
        t_prev = prev.t;
    }
    const TriRow<T> cur = tri_row(j, m, band, n, bc1, bc2, eps_eff, tau);
    *removed += cur.removed;
    return sub(cur.t, mul(psi_prev, t_prev));
}

// Window entry A[a][c] = H[j+1+a, j+1+c], a <= c (padded rows past n: H_ii = 1, no couplings).
template <typename T>
__host__ __device__ inline T window(long long j, int a, int c, const T* band, long long n, int b,
                                    T bc2, T eps_eff) {
    const long long ia = j + 1 + a, ic = j + 1 + c;
    if (ic < n) {
        T v = div(band[ia * (b + 1) + (c - a)], bc2);
        if (a == c) v = add(v, eps_eff);
        return v;
    }
    return a == c ? T(1) : T(0);
}

// Banded row j (b <= MAXB): unpivoted LDLᵀ of the window, prefix Schur complements with the
// per-row bandwidth fallback, ψ_j -> psi, returns t_j = (m̂_j - Σ_k ψ_j[k] m̂_{j+k}) / s_j.
// Adds dropped band edges to *removed and 1 to *fallback when the row fell back.
//
// FIXB > 0 fixes b = FIXB at compile time (MAXB = FIXB): the loops unroll and the window
// arrays live in registers instead of local memory; the operations and their order are
// those of the runtime-b form, so both give the same bits.
template <typename T, int MAXB, int FIXB = 0>
__host__ __device__ inline T band_row(long long j, const T* m, const T* band, T* psi, long long n,
                                      int b_rt, T bc1, T bc2, T eps_eff, T tau,
                                      long long* removed, int* fallback) {
    const int b = FIXB > 0 ? FIXB : b_rt;
    T L[MAXB * (MAXB - 1) / 2 + 1];  // L[r][i], r > i, packed at r(r-1)/2 + i
    T d[MAXB], zv[MAXB], wv[MAXB], ps[MAXB];
    bool okv[MAXB];
#define ARRAYOPT_L(r, i) L[(r) * ((r) - 1) / 2 + (i)]
#pragma unroll
    for (int i = 0; i < b; ++i) {
        const T aii = window(j, i, i, band, n, b, bc2, eps_eff);
        T di = aii;
        for (int l = 0; l < i; ++l)
            di = sub(di, mul(ARRAYOPT_L(i, l), mul(ARRAYOPT_L(i, l), d[l])));
        okv[i] = gt(di, mul(tau, aii));
        if (!okv[i]) di = aii;
        d[i] = di;
        for (int r = i + 1; r < b; ++r) {
            T w = window(j, i, r, band, n, b, bc2, eps_eff);
            for (int l = 0; l < i; ++l)
                w = sub(w, mul(ARRAYOPT_L(r, l), mul(ARRAYOPT_L(i, l), d[l])));
            ARRAYOPT_L(r, i) = div(w, di);
        }
    }
    const long long w0 = b + 1;
    const T d0 = add(div(band[j * w0], bc2), eps_eff);
    T s = d0;
    bool alive = true;
    int kept = 0;
#pragma unroll
    for (int i = 0; i < b; ++i) {
        T zi = (j + 1 + i < n) ? div(band[j * w0 + i + 1], bc2) : T(0);
        for (int l = 0; l < i; ++l) zi = sub(zi, mul(ARRAYOPT_L(i, l), zv[l]));
        zv[i] = zi;
        T wi = div(zi, d[i]);
        const T s_next = sub(s, mul(zi, wi));
        if (alive) alive = okv[i] && gt(s_next, mul(tau, d0));
        if (alive) {
            s = s_next;
            ++kept;
        } else {
            wi = T(0);
        }
        wv[i] = wi;
    }
    const long long rest = n - 1 - j;
    const int real = rest < b ? (int)rest : b;
    if (kept < real) {
        *removed += real - kept;
        *fallback += 1;
    }
#pragma unroll
    for (int i = b - 1; i >= 0; --i) {
        T pi = wv[i];
        for (int r = i + 1; r < b; ++r) pi = sub(pi, mul(ARRAYOPT_L(r, i), ps[r]));
        ps[i] = pi;
    }
#undef ARRAYOPT_L
    T acc = div(m[j], bc1);
#pragma unroll
    for (int k = 1; k <= b; ++k) {
        if (j + k < n) {
            psi[j * b + k - 1] = ps[k - 1];
            acc = sub(acc, mul(ps[k - 1], div(m[j + k], bc1)));
        } else {
            psi[j * b + k - 1] = T(0);
        }
    }
    return div(acc, s);
}

// y_j = t_j - Σ_k ψ_{j-k}[k] t_{j-k}.
template <typename T>
__host__ __device__ inline T band_y(long long j, const T* psi, const T* t, int b) {
    T y = t[j];
    for (int k = 1; k <= b; ++k)
        if (j - k >= 0) y = sub(y, mul(psi[(j - k) * b + k - 1], t[j - k]));
    return y;
}

// scale = ‖target‖ / ‖u‖ (0 when ‖u‖ = 0), rounded once to T (Numba: cast(target / un)).
template <typename T>
__host__ __device__ inline T graft_scale(const double* norms) {
    const double target = ieee::sqrt(norms[0]);
    const double un = ieee::sqrt(norms[1]);
    return gt(un, 0.0) ? from_double<T>(div(target, un)) : T(0);
}

// p_j <- p_j + (-lr)(scale·u_j + λ p_j)
template <typename T>
__host__ __device__ inline void scaled_row(long long j, T* p, const T* u, T scale, T neg_lr,
                                           T wd) {
    const T pj = p[j];
    T d = mul(u[j], scale);
    if (nonzero(wd)) d = add(d, mul(wd, pj));
    p[j] = add(pj, mul(neg_lr, d));
}

// RMSProp-normalized graft, row j of a block: ĝ = g_j/gn, ν_j <- β₂ν_j + (1-β₂)ĝ², returns a_j²
// for a_j = ĝ/(√ν_j + ε_g) (the Numba backend's block driver).
template <typename T>
__host__ __device__ inline double rmsprop_row(long long j, const T* g, T* nu, T gn, T b2, T omb2,
                                              T graft_eps) {
    const T gh = div(g[j], gn);
    const T v = add(mul(nu[j], b2), mul(mul(gh, gh), omb2));
    nu[j] = v;
    const double a = to_double(div(gh, add(ieee::sqrt(v), graft_eps)));
    return mul(a, a);
}

// The block's ‖g‖ as T (float64 sum of squares, one rounding), 1 when it is 0.
template <typename T>
__host__ __device__ inline T block_gnorm(double sumsq) {
    const T gn = from_double<T>(ieee::sqrt(sumsq));
    return gt(gn, T(0)) ? gn : T(1);
}

// small_param_fallback="adam": p_j <- p_j + (-lr)(m̂_j/(√v̂_j + ε_g) + λ p_j).
template <typename T>
__host__ __device__ inline void adam_row(long long j, T* p, const T* m, const T* band, int b,
                                         T bc1, T bc2, T graft_eps, T neg_lr, T wd) {
    const T pj = p[j];
    T d = div(div(m[j], bc1), add(ieee::sqrt(div(band[j * (long long)(b + 1)], bc2)), graft_eps));
    if (nonzero(wd)) d = add(d, mul(wd, pj));
    p[j] = add(pj, mul(neg_lr, d));
}

}  // namespace sonew
}  // namespace arrayopt

#endif  // ARRAYOPT_SONEW_ROWS_CUH
