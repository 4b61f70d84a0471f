// SONew kernels of arrayopt (arrayopt/sonew/; math in docs/sonew.md): the fused
// step for tridiagonal (b = 1) and banded (any b <= 32, b = 0 diag-SONew) preconditioners.
//
// Same arithmetic, in the same order, as the Numba backend's SONew step (itself the order of
// SONew.flat_leaf and arrayopt/sonew/math.py); every float operation is an `ieee::`
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
// Files: sonew_rows.cuh (the per-row math, shared by the kernels and the harness), this file
// (the kernels and their explicit instantiations), sonew_host.cuh (`ARRAYOPT_HOST_HARNESS`:
// extern "C" `host_<kernel>_<f32|f64>` with the kernels' parameter lists, looping over the rows
// in order; tests, via ctypes, see tests/support/_cuda_host_harness.py).

#include "sonew_rows.cuh"

namespace arrayopt {

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

#if defined(ARRAYOPT_HOST_HARNESS)
#include "sonew_host.cuh"
#endif
