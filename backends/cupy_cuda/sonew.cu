// SONew kernels of arrayopt (arrayopt/sonew/; math in docs/sonew.md): the fused
// step for tridiagonal (b = 1) and banded (any b <= 32, b = 0 diag-SONew) preconditioners.
//
// Same arithmetic, in the same order, as backends/numba_cpu/sonew.py (itself the order of
// SONew.flat_leaf and arrayopt/linalg/sonew.py); every float operation is an `ieee::`
// function (rn_ops.cuh): explicit `.rn` PTX without `.ftz` on the device, so CuPy's forced
// -ftz=true changes nothing and no FMA is formed. Norm accumulators are double.
//
// Layout: `band` is (n, b+1) row-major, band[j*(b+1)+k] = B[j, j+k]; `psi` (n, b) scratch,
// psi[j*b+k-1] = ψ_j[k]; `norms` double[2] = {graft target², ‖u‖²} (zeroed by the caller);
// `counts` unsigned long long[2] = {removed band edges, fallback rows} (zeroed by the
// caller); `rowmax` T[1] = max row sum of |Ĥ| (zeroed by the caller; non-negative, so an
// integer atomicMax on its bits is a float max).
//
// One thread per row (grid-stride loops). Global quantities the Numba path reduces over
// chunks are block reductions followed by one atomic per block. Passes per leaf:
//   1. sonew_stats      m, band in place; graft target² -> norms[0]
//   2. sonew_rowmax     (relative eps only) max row sum of |Ĥ| -> rowmax (read-only pass: a
//                       row's sum needs the *new* band of the b rows above it)
//   3. b = 1: sonew_tri_precond   per row ψ, s with edge removal for rows j-1 and j (row
//                       j-1 recomputed, as Numba does at its chunk boundaries), y = L D Lᵀ m̂,
//                       p updated (graft "none") or u written and ‖u‖² -> norms[1]
//      else:  sonew_band_factor_b2.._b8 (b fixed: window in registers), _8 (b = 0) or _32
//                       (9 <= b <= 32: the size of the per-thread window)
//                       per row LDLᵀ of the b×b window with the bandwidth fallback, ψ -> psi,
//                       t = D⁻¹ Lᵀ m̂; then sonew_band_apply: y = L t, p or u as above
//   4. sonew_scaled_apply (graft only) p <- p + (-lr)(scale·u + λp),
//                       scale = sqrt(norms[0]) / sqrt(norms[1]) (0 when ‖u‖ = 0), on the device
//
// `ARRAYOPT_HOST_HARNESS`: extern "C" `host_<kernel>_<f32|f64>` with the kernels' parameter
// lists, looping over the rows in order (tests, via ctypes; see tests/_cuda_host_harness.py).

#include "rn_ops.cuh"

namespace arrayopt {
namespace sonew {

using namespace ieee;

// graft codes (backends/numba_cpu/sonew.py GRAFT_CODES)
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
// for a_j = ĝ/(√ν_j + ε_g) (backends/numba_cpu/sonew_blocks.py).
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

// ------------------------------------------------------------------ kernels
#if !defined(ARRAYOPT_HOST_HARNESS)

namespace sonew {

// Block reductions (blockDim.x a multiple of 32, at most 1024); the result is valid in
// thread 0. Each starts with a barrier so one kernel may call them more than once.
__device__ inline double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v = add(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;
}
__device__ inline unsigned long long warp_sum(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
template <typename T>
__device__ inline T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        const T x = __shfl_down_sync(0xffffffffu, v, o);
        if (gt(x, v)) v = x;
    }
    return v;
}

template <typename V>
__device__ inline V block_sum(V v) {
    __shared__ V part[32];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < (int)(blockDim.x >> 5)) ? part[lane] : V(0);
        v = warp_sum(v);
    }
    return v;
}

template <typename T>
__device__ inline T block_max(T v) {  // v >= +0 (not NaN) in every thread
    __shared__ T part[32];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < (int)(blockDim.x >> 5)) ? part[lane] : T(0);
        v = warp_max(v);
    }
    return v;
}

// max of non-negative floats = max of their bit patterns as unsigned integers
__device__ inline void atomic_max_nonneg(float* addr, float v) {
    atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}
__device__ inline void atomic_max_nonneg(double* addr, double v) {
    atomicMax(reinterpret_cast<unsigned long long*>(addr),
              (unsigned long long)__double_as_longlong(v));
}

}  // namespace sonew

#define ARRAYOPT_ROWS(j, n)                                                            \
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < (n);      \
         j += (long long)blockDim.x * gridDim.x)

template <typename T>
__global__ void sonew_stats(const T* g, T* m, T* band, long long n, int b, T omb1, T b2, T omb2,
                            T bc1, T bc2, T graft_eps, int graft, double* norms) {
    double acc = 0.0;
    ARRAYOPT_ROWS(j, n) {
        acc = ieee::add(acc, sonew::stats_row(j, g, m, band, n, b, omb1, b2, omb2, bc1, bc2,
                                              graft_eps, graft));
    }
    if (graft != sonew::GRAFT_NONE) {
        acc = sonew::block_sum(acc);
        if (threadIdx.x == 0) atomicAdd(&norms[0], acc);
    }
}

template <typename T>
__global__ void sonew_rowmax(const T* band, long long n, int b, T bc2, T* rowmax) {
    T rmax = T(0);
    ARRAYOPT_ROWS(j, n) {
        const T r = sonew::rowsum(j, band, n, b, bc2);
        if (ieee::gt(r, rmax)) rmax = r;
    }
    rmax = sonew::block_max(rmax);
    if (threadIdx.x == 0) sonew::atomic_max_nonneg(rowmax, rmax);
}

template <typename T>
__global__ void sonew_tri_precond(T* p, const T* m, const T* band, T* u, long long n, T bc1,
                                  T bc2, const T* rowmax, T eps, T eps_min, int relative, T tau,
                                  T neg_lr, T wd, int write_p, double* norms,
                                  unsigned long long* counts) {
    const T eps_eff = sonew::eps_effective(rowmax, eps, eps_min, relative);
    double acc = 0.0;
    int removed = 0;
    ARRAYOPT_ROWS(j, n) {
        const T y = sonew::tri_y(j, m, band, n, bc1, bc2, eps_eff, tau, &removed);
        acc = ieee::add(acc, sonew::write_row(j, y, p, u, neg_lr, wd, write_p));
    }
    const unsigned long long rem = sonew::block_sum((unsigned long long)removed);
    if (threadIdx.x == 0 && rem) {
        atomicAdd(&counts[0], rem);  // tridiagonal: a fallback row is one removed edge
        atomicAdd(&counts[1], rem);
    }
    if (!write_p) {
        acc = sonew::block_sum(acc);
        if (threadIdx.x == 0) atomicAdd(&norms[1], acc);
    }
}

template <typename T, int MAXB, int FIXB = 0>
__device__ inline void band_factor_kernel(const T* m, const T* band, T* psi, T* t, long long n,
                                          int b, T bc1, T bc2, const T* rowmax, T eps, T eps_min,
                                          int relative, T tau, unsigned long long* counts) {
    const T eps_eff = sonew::eps_effective(rowmax, eps, eps_min, relative);
    long long removed = 0;
    int fallback = 0;
    ARRAYOPT_ROWS(j, n) {
        t[j] = sonew::band_row<T, MAXB, FIXB>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau,
                                               &removed, &fallback);
    }
    const unsigned long long rem = sonew::block_sum((unsigned long long)removed);
    const unsigned long long fb = sonew::block_sum((unsigned long long)fallback);
    if (threadIdx.x == 0 && fb) {
        atomicAdd(&counts[0], rem);
        atomicAdd(&counts[1], fb);
    }
}

// b <= 8 and b <= 32: the per-thread window arrays are sized by the bound.
template <typename T>
__global__ void sonew_band_factor_8(const T* m, const T* band, T* psi, T* t, long long n, int b,
                                    T bc1, T bc2, const T* rowmax, T eps, T eps_min, int relative,
                                    T tau, unsigned long long* counts) {
    band_factor_kernel<T, 8>(m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min, relative,
                             tau, counts);
}
template <typename T>
__global__ void sonew_band_factor_32(const T* m, const T* band, T* psi, T* t, long long n, int b,
                                     T bc1, T bc2, const T* rowmax, T eps, T eps_min,
                                     int relative, T tau, unsigned long long* counts) {
    band_factor_kernel<T, 32>(m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min, relative,
                              tau, counts);
}

// b = 2..8 exactly (the caller passes that b): window arrays in registers.
#define ARRAYOPT_EXACT_BAND(B)                                                              \
    template <typename T>                                                                   \
    __global__ void sonew_band_factor_b##B(const T* m, const T* band, T* psi, T* t,         \
                                           long long n, int b, T bc1, T bc2,                \
                                           const T* rowmax, T eps, T eps_min, int relative, \
                                           T tau, unsigned long long* counts) {             \
        band_factor_kernel<T, B, B>(m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min,  \
                                    relative, tau, counts);                                 \
    }
ARRAYOPT_EXACT_BAND(2)
ARRAYOPT_EXACT_BAND(3)
ARRAYOPT_EXACT_BAND(4)
ARRAYOPT_EXACT_BAND(5)
ARRAYOPT_EXACT_BAND(6)
ARRAYOPT_EXACT_BAND(7)
ARRAYOPT_EXACT_BAND(8)
#undef ARRAYOPT_EXACT_BAND

template <typename T>
__global__ void sonew_band_apply(T* p, const T* psi, const T* t, T* u, long long n, int b,
                                 T neg_lr, T wd, int write_p, double* norms) {
    double acc = 0.0;
    ARRAYOPT_ROWS(j, n) {
        const T y = sonew::band_y(j, psi, t, b);
        acc = ieee::add(acc, sonew::write_row(j, y, p, u, neg_lr, wd, write_p));
    }
    if (!write_p) {
        acc = sonew::block_sum(acc);
        if (threadIdx.x == 0) atomicAdd(&norms[1], acc);
    }
}

template <typename T>
__global__ void sonew_scaled_apply(T* p, const T* u, long long n, const double* norms, T neg_lr,
                                   T wd) {
    const T scale = sonew::graft_scale<T>(norms);
    ARRAYOPT_ROWS(j, n) sonew::scaled_row(j, p, u, scale, neg_lr, wd);
}

#undef ARRAYOPT_ROWS

// Block-local SONew (block_size): thread block c owns entries [c·bsz, c·bsz + nl) and nothing
// else. Its arrays are the global ones offset to the block, with n = nl, so the band is cut at
// the block's edges by construction; the row-sum max and both graft norms are block reductions
// (broadcast through shared memory): no atomics between blocks, no grid-wide synchronisation.
// psi (n·b), t (n) and u (n) are scratch; nu is the rmsprop_normalized accumulator (1 dummy
// entry otherwise). Same per-row functions, in the same order, as the Numba block driver.
namespace sonew {
template <typename V>
__device__ inline V block_sum_all(V v) {
    __shared__ V out;
    v = block_sum(v);
    if (threadIdx.x == 0) out = v;
    __syncthreads();
    return out;
}
template <typename T>
__device__ inline T block_max_all(T v) {
    __shared__ T out;
    v = block_max(v);
    if (threadIdx.x == 0) out = v;
    __syncthreads();
    return out;
}
}  // namespace sonew

#define ARRAYOPT_BLOCK_ROWS(j, nl) for (long long j = threadIdx.x; j < (nl); j += blockDim.x)

template <typename T, int MAXB>
__device__ inline void block_step_kernel(T* p, const T* g, T* m, T* band, T* nu, T* psi, T* t,
                                         T* u, long long n, int b, long long bsz, T omb1, T b2,
                                         T omb2, T bc1, T bc2, T graft_eps, int graft, T eps,
                                         T eps_min, int relative, T tau, T neg_lr, T wd,
                                         int adam_fallback, unsigned long long* counts) {
    using namespace sonew;
    const long long lo = (long long)blockIdx.x * bsz;
    if (lo >= n) return;
    const long long nl = (n - lo < bsz) ? n - lo : bsz;
    const long long w = b + 1;
    const T* gl = g + lo;
    T *ml = m + lo, *bl = band + lo * w, *pl = p + lo, *ul = u + lo, *tl = t + lo;
    T* psil = psi + lo * b;
    const int sgraft = graft == GRAFT_RMSPROP_NORMALIZED ? (int)GRAFT_NONE : graft;
    double acc = 0.0;
    ARRAYOPT_BLOCK_ROWS(j, nl)
    acc = ieee::add(acc, stats_row(j, gl, ml, bl, nl, b, omb1, b2, omb2, bc1, bc2, graft_eps,
                                   sgraft));
    double target2 = block_sum_all(acc);  // also the barrier after the band writes
    if (graft == GRAFT_RMSPROP_NORMALIZED) {
        double gs = 0.0;
        ARRAYOPT_BLOCK_ROWS(j, nl) {
            const double gd = to_double(gl[j]);
            gs = ieee::add(gs, ieee::mul(gd, gd));
        }
        const T gn = block_gnorm<T>(block_sum_all(gs));
        double a2 = 0.0;
        ARRAYOPT_BLOCK_ROWS(j, nl)
        a2 = ieee::add(a2, rmsprop_row(j, gl, nu + lo, gn, b2, omb2, graft_eps));
        target2 = block_sum_all(a2);
    }
    T eps_eff = eps;
    if (relative) {
        T r = T(0);
        ARRAYOPT_BLOCK_ROWS(j, nl) {
            const T rj = rowsum(j, bl, nl, b, bc2);
            if (gt(rj, r)) r = rj;
        }
        r = block_max_all(r);
        eps_eff = eps_effective(&r, eps, eps_min, 1);
    }
    const int write_p = graft == GRAFT_NONE && !adam_fallback;
    double u2 = 0.0;
    long long removed = 0;
    int fallback = 0;
    if (b == 1) {
        int rem = 0;
        ARRAYOPT_BLOCK_ROWS(j, nl) {
            const T y = tri_y(j, ml, bl, nl, bc1, bc2, eps_eff, tau, &rem);
            u2 = ieee::add(u2, write_row(j, y, pl, ul, neg_lr, wd, write_p));
        }
        removed = rem;
        fallback = rem;
    } else {
        ARRAYOPT_BLOCK_ROWS(j, nl)
        tl[j] = band_row<T, MAXB>(j, ml, bl, psil, nl, b, bc1, bc2, eps_eff, tau, &removed,
                                  &fallback);
        __syncthreads();
        ARRAYOPT_BLOCK_ROWS(j, nl) {
            const T y = band_y(j, psil, tl, b);
            u2 = ieee::add(u2, write_row(j, y, pl, ul, neg_lr, wd, write_p));
        }
    }
    const unsigned long long rem_all = block_sum((unsigned long long)removed);
    const unsigned long long fb_all = block_sum((unsigned long long)fallback);
    if (threadIdx.x == 0 && fb_all) {
        atomicAdd(&counts[0], rem_all);
        atomicAdd(&counts[1], fb_all);
    }
    if (adam_fallback) {
        ARRAYOPT_BLOCK_ROWS(j, nl) adam_row(j, pl, ml, bl, b, bc1, bc2, graft_eps, neg_lr, wd);
    } else if (!write_p) {
        const double norms[2] = {target2, block_sum_all(u2)};
        const T scale = graft_scale<T>(norms);
        ARRAYOPT_BLOCK_ROWS(j, nl) scaled_row(j, pl, ul, scale, neg_lr, wd);
    }
}
#undef ARRAYOPT_BLOCK_ROWS

template <typename T>
__global__ void sonew_block_step_8(T* p, const T* g, T* m, T* band, T* nu, T* psi, T* t, T* u,
                                   long long n, int b, long long bsz, T omb1, T b2, T omb2, T bc1,
                                   T bc2, T graft_eps, int graft, T eps, T eps_min, int relative,
                                   T tau, T neg_lr, T wd, int adam_fallback,
                                   unsigned long long* counts) {
    block_step_kernel<T, 8>(p, g, m, band, nu, psi, t, u, n, b, bsz, omb1, b2, omb2, bc1, bc2,
                            graft_eps, graft, eps, eps_min, relative, tau, neg_lr, wd,
                            adam_fallback, counts);
}
template <typename T>
__global__ void sonew_block_step_32(T* p, const T* g, T* m, T* band, T* nu, T* psi, T* t, T* u,
                                    long long n, int b, long long bsz, T omb1, T b2, T omb2,
                                    T bc1, T bc2, T graft_eps, int graft, T eps, T eps_min,
                                    int relative, T tau, T neg_lr, T wd, int adam_fallback,
                                    unsigned long long* counts) {
    block_step_kernel<T, 32>(p, g, m, band, nu, psi, t, u, n, b, bsz, omb1, b2, omb2, bc1, bc2,
                             graft_eps, graft, eps, eps_min, relative, tau, neg_lr, wd,
                             adam_fallback, counts);
}

// Explicit instantiations, so that a plain `nvcc --cubin` compiles every kernel; CuPy also
// names them in `name_expressions`.
#define ARRAYOPT_INSTANTIATE_EXACT(T, B)                                                    \
    template __global__ void sonew_band_factor_b##B<T>(const T*, const T*, T*, T*, long long, \
                                                       int, T, T, const T*, T, T, int, T,   \
                                                       unsigned long long*);
#define ARRAYOPT_INSTANTIATE(T)                                                             \
    template __global__ void sonew_stats<T>(const T*, T*, T*, long long, int, T, T, T, T, T, \
                                            T, int, double*);                               \
    template __global__ void sonew_rowmax<T>(const T*, long long, int, T, T*);             \
    template __global__ void sonew_tri_precond<T>(T*, const T*, const T*, T*, long long, T, T, \
                                                  const T*, T, T, int, T, T, T, int, double*, \
                                                  unsigned long long*);                     \
    template __global__ void sonew_band_factor_8<T>(const T*, const T*, T*, T*, long long, int, \
                                                    T, T, const T*, T, T, int, T,           \
                                                    unsigned long long*);                   \
    template __global__ void sonew_band_factor_32<T>(const T*, const T*, T*, T*, long long,  \
                                                     int, T, T, const T*, T, T, int, T,     \
                                                     unsigned long long*);                  \
    ARRAYOPT_INSTANTIATE_EXACT(T, 2) ARRAYOPT_INSTANTIATE_EXACT(T, 3)                      \
    ARRAYOPT_INSTANTIATE_EXACT(T, 4) ARRAYOPT_INSTANTIATE_EXACT(T, 5)                      \
    ARRAYOPT_INSTANTIATE_EXACT(T, 6) ARRAYOPT_INSTANTIATE_EXACT(T, 7)                      \
    ARRAYOPT_INSTANTIATE_EXACT(T, 8)                                                       \
    template __global__ void sonew_band_apply<T>(T*, const T*, const T*, T*, long long, int, T, \
                                                 T, int, double*);                          \
    template __global__ void sonew_scaled_apply<T>(T*, const T*, long long, const double*, T, T); \
    template __global__ void sonew_block_step_8<T>(T*, const T*, T*, T*, T*, T*, T*, T*, long long, \
                                                   int, long long, T, T, T, T, T, T, int, T, T, \
                                                   int, T, T, T, int, unsigned long long*);  \
    template __global__ void sonew_block_step_32<T>(T*, const T*, T*, T*, T*, T*, T*, T*,      \
                                                    long long, int, long long, T, T, T, T, T, T, \
                                                    int, T, T, int, T, T, T, int,            \
                                                    unsigned long long*);
ARRAYOPT_INSTANTIATE(float)
ARRAYOPT_INSTANTIATE(double)
#undef ARRAYOPT_INSTANTIATE
#undef ARRAYOPT_INSTANTIATE_EXACT

#endif  // !ARRAYOPT_HOST_HARNESS

}  // namespace arrayopt

// ------------------------------------------------------------------ host harness
#if defined(ARRAYOPT_HOST_HARNESS)
// `host_<kernel>_<f32|f64>`: the kernel's parameter list, run on the host over the rows in
// order; the block reductions and atomics become plain sums and a max.
namespace arrayopt {
namespace sonew {
// band_row of the kernel `kind`: 8 or 32 (runtime b <= kind), or -B (b = B fixed, 2..8)
template <typename T>
inline T host_band_row(int kind, long long j, const T* m, const T* band, T* psi, long long n,
                       int b, T bc1, T bc2, T eps_eff, T tau, long long* removed,
                       int* fallback) {
    switch (kind) {
        case -2: return band_row<T, 2, 2>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -3: return band_row<T, 3, 3>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -4: return band_row<T, 4, 4>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -5: return band_row<T, 5, 5>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -6: return band_row<T, 6, 6>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -7: return band_row<T, 7, 7>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case -8: return band_row<T, 8, 8>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        case 8: return band_row<T, 8>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
        default: return band_row<T, 32>(j, m, band, psi, n, b, bc1, bc2, eps_eff, tau, removed, fallback);
    }
}
}  // namespace sonew
}  // namespace arrayopt
#define ARRAYOPT_HOST_EXACT(T, SUF, B)                                                        \
    extern "C" void host_sonew_band_factor_b##B##_##SUF(                                      \
        const T* m, const T* band, T* psi, T* t, long long n, int b, T bc1, T bc2,            \
        const T* rowmax, T eps, T eps_min, int relative, T tau, unsigned long long* counts) { \
        host_band_factor_##SUF(-B, m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min,     \
                               relative, tau, counts);                                        \
    }
#define ARRAYOPT_HOST(T, SUF)                                                                 \
    extern "C" void host_sonew_stats_##SUF(const T* g, T* m, T* band, long long n, int b,     \
                                           T omb1, T b2, T omb2, T bc1, T bc2, T graft_eps,   \
                                           int graft, double* norms) {                        \
        double acc = 0.0;                                                                     \
        for (long long j = 0; j < n; ++j)                                                     \
            acc += arrayopt::sonew::stats_row(j, g, m, band, n, b, omb1, b2, omb2, bc1, bc2,  \
                                              graft_eps, graft);                              \
        if (graft != 0) norms[0] += acc;                                                      \
    }                                                                                         \
    extern "C" void host_sonew_rowmax_##SUF(const T* band, long long n, int b, T bc2,         \
                                            T* rowmax) {                                      \
        for (long long j = 0; j < n; ++j) {                                                   \
            const T r = arrayopt::sonew::rowsum(j, band, n, b, bc2);                          \
            if (r > rowmax[0]) rowmax[0] = r;                                                 \
        }                                                                                     \
    }                                                                                         \
    extern "C" void host_sonew_tri_precond_##SUF(                                             \
        T* p, const T* m, const T* band, T* u, long long n, T bc1, T bc2, const T* rowmax,    \
        T eps, T eps_min, int relative, T tau, T neg_lr, T wd, int write_p, double* norms,    \
        unsigned long long* counts) {                                                         \
        const T eps_eff = arrayopt::sonew::eps_effective(rowmax, eps, eps_min, relative);     \
        double acc = 0.0;                                                                     \
        int removed = 0;                                                                      \
        for (long long j = 0; j < n; ++j) {                                                   \
            const T y = arrayopt::sonew::tri_y(j, m, band, n, bc1, bc2, eps_eff, tau,         \
                                               &removed);                                     \
            acc += arrayopt::sonew::write_row(j, y, p, u, neg_lr, wd, write_p);               \
        }                                                                                     \
        counts[0] += removed;                                                                 \
        counts[1] += removed;                                                                 \
        if (!write_p) norms[1] += acc;                                                        \
    }                                                                                         \
    static void host_band_factor_##SUF(int maxb, const T* m, const T* band, T* psi, T* t,     \
                                       long long n, int b, T bc1, T bc2, const T* rowmax,     \
                                       T eps, T eps_min, int relative, T tau,                 \
                                       unsigned long long* counts) {                          \
        const T eps_eff = arrayopt::sonew::eps_effective(rowmax, eps, eps_min, relative);     \
        long long removed = 0;                                                                \
        int fallback = 0;                                                                     \
        for (long long j = 0; j < n; ++j)                                                     \
            t[j] = arrayopt::sonew::host_band_row(maxb, j, m, band, psi, n, b, bc1, bc2,      \
                                                  eps_eff, tau, &removed, &fallback);         \
        counts[0] += removed;                                                                 \
        counts[1] += fallback;                                                                \
    }                                                                                         \
    extern "C" void host_sonew_band_factor_8_##SUF(                                           \
        const T* m, const T* band, T* psi, T* t, long long n, int b, T bc1, T bc2,            \
        const T* rowmax, T eps, T eps_min, int relative, T tau, unsigned long long* counts) { \
        host_band_factor_##SUF(8, m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min,      \
                               relative, tau, counts);                                        \
    }                                                                                         \
    extern "C" void host_sonew_band_factor_32_##SUF(                                          \
        const T* m, const T* band, T* psi, T* t, long long n, int b, T bc1, T bc2,            \
        const T* rowmax, T eps, T eps_min, int relative, T tau, unsigned long long* counts) { \
        host_band_factor_##SUF(32, m, band, psi, t, n, b, bc1, bc2, rowmax, eps, eps_min,     \
                               relative, tau, counts);                                        \
    }                                                                                         \
    ARRAYOPT_HOST_EXACT(T, SUF, 2) ARRAYOPT_HOST_EXACT(T, SUF, 3)                            \
    ARRAYOPT_HOST_EXACT(T, SUF, 4) ARRAYOPT_HOST_EXACT(T, SUF, 5)                            \
    ARRAYOPT_HOST_EXACT(T, SUF, 6) ARRAYOPT_HOST_EXACT(T, SUF, 7)                            \
    ARRAYOPT_HOST_EXACT(T, SUF, 8)                                                           \
    extern "C" void host_sonew_band_apply_##SUF(T* p, const T* psi, const T* t, T* u,         \
                                                long long n, int b, T neg_lr, T wd,           \
                                                int write_p, double* norms) {                 \
        double acc = 0.0;                                                                     \
        for (long long j = 0; j < n; ++j) {                                                   \
            const T y = arrayopt::sonew::band_y(j, psi, t, b);                                \
            acc += arrayopt::sonew::write_row(j, y, p, u, neg_lr, wd, write_p);               \
        }                                                                                     \
        if (!write_p) norms[1] += acc;                                                        \
    }                                                                                         \
    extern "C" void host_sonew_scaled_apply_##SUF(T* p, const T* u, long long n,              \
                                                  const double* norms, T neg_lr, T wd) {      \
        const T scale = arrayopt::sonew::graft_scale<T>(norms);                               \
        for (long long j = 0; j < n; ++j) arrayopt::sonew::scaled_row(j, p, u, scale, neg_lr, wd); \
    }
// block-local step: the device kernel's phases, block after block, rows in order
namespace arrayopt {
namespace sonew {
template <typename T>
inline void host_block_step(int maxb, T* p, const T* g, T* m, T* band, T* nu, T* psi, T* t, T* u,
                            long long n, int b, long long bsz, T omb1, T b2, T omb2, T bc1, T bc2,
                            T graft_eps, int graft, T eps, T eps_min, int relative, T tau,
                            T neg_lr, T wd, int adam_fallback, unsigned long long* counts) {
    const long long w = b + 1;
    for (long long lo = 0; lo < n; lo += bsz) {
        const long long nl = (n - lo < bsz) ? n - lo : bsz;
        const T* gl = g + lo;
        T *ml = m + lo, *bl = band + lo * w, *pl = p + lo, *ul = u + lo, *tl = t + lo;
        T* psil = psi + lo * b;
        const int sgraft = graft == GRAFT_RMSPROP_NORMALIZED ? (int)GRAFT_NONE : graft;
        double target2 = 0.0;
        for (long long j = 0; j < nl; ++j)
            target2 += stats_row(j, gl, ml, bl, nl, b, omb1, b2, omb2, bc1, bc2, graft_eps, sgraft);
        if (graft == GRAFT_RMSPROP_NORMALIZED) {
            double gs = 0.0;
            for (long long j = 0; j < nl; ++j) gs += to_double(gl[j]) * to_double(gl[j]);
            const T gn = block_gnorm<T>(gs);
            target2 = 0.0;
            for (long long j = 0; j < nl; ++j)
                target2 += rmsprop_row(j, gl, nu + lo, gn, b2, omb2, graft_eps);
        }
        T eps_eff = eps;
        if (relative) {
            T r = T(0);
            for (long long j = 0; j < nl; ++j) {
                const T rj = rowsum(j, bl, nl, b, bc2);
                if (gt(rj, r)) r = rj;
            }
            eps_eff = eps_effective(&r, eps, eps_min, 1);
        }
        const int write_p = graft == GRAFT_NONE && !adam_fallback;
        double u2 = 0.0;
        long long removed = 0;
        int fallback = 0;
        if (b == 1) {
            int rem = 0;
            for (long long j = 0; j < nl; ++j)
                u2 += write_row(j, tri_y(j, ml, bl, nl, bc1, bc2, eps_eff, tau, &rem), pl, ul,
                                neg_lr, wd, write_p);
            removed = rem;
            fallback = rem;
        } else {
            for (long long j = 0; j < nl; ++j)
                tl[j] = host_band_row(maxb, j, ml, bl, psil, nl, b, bc1, bc2, eps_eff, tau,
                                      &removed, &fallback);
            for (long long j = 0; j < nl; ++j)
                u2 += write_row(j, band_y(j, psil, tl, b), pl, ul, neg_lr, wd, write_p);
        }
        counts[0] += removed;
        counts[1] += fallback;
        if (adam_fallback) {
            for (long long j = 0; j < nl; ++j)
                adam_row(j, pl, ml, bl, b, bc1, bc2, graft_eps, neg_lr, wd);
        } else if (!write_p) {
            const double norms[2] = {target2, u2};
            const T scale = graft_scale<T>(norms);
            for (long long j = 0; j < nl; ++j) scaled_row(j, pl, ul, scale, neg_lr, wd);
        }
    }
}
}  // namespace sonew
}  // namespace arrayopt
#define ARRAYOPT_HOST_BLOCK(T, SUF, MAXB)                                                     \
    extern "C" void host_sonew_block_step_##MAXB##_##SUF(                                     \
        T* p, const T* g, T* m, T* band, T* nu, T* psi, T* t, T* u, long long n, int b,       \
        long long bsz, T omb1, T b2, T omb2, T bc1, T bc2, T graft_eps, int graft, T eps,     \
        T eps_min, int relative, T tau, T neg_lr, T wd, int adam_fallback,                    \
        unsigned long long* counts) {                                                         \
        arrayopt::sonew::host_block_step<T>(MAXB, p, g, m, band, nu, psi, t, u, n, b, bsz,    \
                                            omb1, b2, omb2, bc1, bc2, graft_eps, graft, eps,  \
                                            eps_min, relative, tau, neg_lr, wd,               \
                                            adam_fallback, counts);                           \
    }
ARRAYOPT_HOST(float, f32)
ARRAYOPT_HOST(double, f64)
ARRAYOPT_HOST_BLOCK(float, f32, 8)
ARRAYOPT_HOST_BLOCK(double, f64, 8)
ARRAYOPT_HOST_BLOCK(float, f32, 32)
ARRAYOPT_HOST_BLOCK(double, f64, 32)
#undef ARRAYOPT_HOST_BLOCK
#undef ARRAYOPT_HOST
#undef ARRAYOPT_HOST_EXACT
#endif  // ARRAYOPT_HOST_HARNESS
