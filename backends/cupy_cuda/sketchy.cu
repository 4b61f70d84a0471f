// Sketchy's step after the low-rank apply (backends/numba_cpu/sketchy.py is the same step on the
// CPU; arrayopt/sketchy/optimizer.py leaf_update the reference):
//
//   sketchy_norms:  the graft accumulator A updated in place (kind 1 adagrad A += g^2; kind 2, 3
//                   rmsprop/adam A = b2*A + (1-b2)*g^2), the graft direction a (kind 0 sgd: a = g;
//                   adam a = g/(sqrt(A)/sqrt(bc2) + eps); else a = g/(sqrt(A) + eps)) and one
//                   double partial sum of a^2 and of d^2 per thread (the host adds the partials).
//   sketchy_write:  u = scale*d (or u = a, its accumulator updated here, for a graft-only leaf),
//                   u *= w1; m = b1*m + u; v = u + b1*m (Nesterov) or m; v += wd*p; p += v*(-lr).
//
// Layout as eva.cu: IEEE round-to-nearest operations from rn_ops.cuh in __host__ __device__
// functions, thin grid-stride __global__ templates, and under ARRAYOPT_HOST_HARNESS extern "C"
// host functions with the kernels' parameter lists (one thread: partial sums in part[0]).

#include "rn_ops.cuh"

namespace arrayopt {

template <typename T>
__host__ __device__ inline T sketchy_graft_at(long long i, const T* g, T* acc, int kind, T b2, T omb2, T eps,
                                              T bc2s) {
    T gi = g[i];
    if (kind == 0) return gi;
    T ai = kind == 1 ? ieee::add(acc[i], ieee::mul(gi, gi))
                     : ieee::add(ieee::mul(acc[i], b2), ieee::mul(ieee::mul(gi, gi), omb2));
    acc[i] = ai;
    T den = kind == 3 ? ieee::add(ieee::div(ieee::sqrt(ai), bc2s), eps) : ieee::add(ieee::sqrt(ai), eps);
    return ieee::div(gi, den);
}

template <typename T>
__host__ __device__ inline void sketchy_write_at(long long i, T* p, const T* g, T* acc, const T* d, T* m,
                                                 int kind, int precond, T scale, T b2, T omb2, T eps, T bc2s,
                                                 T b1, T w1, int nesterov, int use_m, T wd, T lr) {
    T u = precond ? ieee::mul(d[i], scale) : sketchy_graft_at(i, g, acc, kind, b2, omb2, eps, bc2s);
    if (w1 != T(1)) u = ieee::mul(u, w1);
    T v = u;
    if (use_m) {
        T mi = ieee::add(ieee::mul(m[i], b1), u);
        m[i] = mi;
        v = nesterov ? ieee::add(u, ieee::mul(mi, b1)) : mi;
    }
    if (ieee::nonzero(wd)) v = ieee::add(v, ieee::mul(p[i], wd));
    p[i] = ieee::add(p[i], ieee::mul(v, -lr));
}

#define ARRAYOPT_GRID_STRIDE(i, n)                                                    \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);     \
         i += (long long)blockDim.x * gridDim.x)

template <typename T>
__global__ void sketchy_norms(const T* g, T* acc, const T* d, long long n, int kind, T b2, T omb2, T eps,
                              T bc2s, double* part_a, double* part_d) {
    double sa = 0.0, sd = 0.0;
    ARRAYOPT_GRID_STRIDE(i, n) {
        double a = (double)sketchy_graft_at(i, g, acc, kind, b2, omb2, eps, bc2s);
        double x = (double)d[i];
        sa = ieee::add(sa, ieee::mul(a, a));
        sd = ieee::add(sd, ieee::mul(x, x));
    }
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    part_a[t] = sa;
    part_d[t] = sd;
}

template <typename T>
__global__ void sketchy_write(T* p, const T* g, T* acc, const T* d, T* m, long long n, int kind, int precond,
                              T scale, T b2, T omb2, T eps, T bc2s, T b1, T w1, int nesterov, int use_m, T wd,
                              T lr) {
    ARRAYOPT_GRID_STRIDE(i, n)
        sketchy_write_at(i, p, g, acc, d, m, kind, precond, scale, b2, omb2, eps, bc2s, b1, w1, nesterov, use_m,
                         wd, lr);
}

#undef ARRAYOPT_GRID_STRIDE

#if !defined(ARRAYOPT_HOST_HARNESS)
#define ARRAYOPT_INSTANTIATE(T)                                                                          \
    template __global__ void sketchy_norms<T>(const T*, T*, const T*, long long, int, T, T, T, T, double*, \
                                              double*);                                                  \
    template __global__ void sketchy_write<T>(T*, const T*, T*, const T*, T*, long long, int, int, T, T, T, \
                                              T, T, T, T, int, int, T, T);
ARRAYOPT_INSTANTIATE(float)
ARRAYOPT_INSTANTIATE(double)
#undef ARRAYOPT_INSTANTIATE
#endif

}  // namespace arrayopt

#if defined(ARRAYOPT_HOST_HARNESS)
#define ARRAYOPT_HOST(T, SUF)                                                                             \
    extern "C" void host_sketchy_norms_##SUF(const T* g, T* acc, const T* d, long long n, int kind, T b2,  \
                                             T omb2, T eps, T bc2s, double* part_a, double* part_d) {     \
        double sa = 0.0, sd = 0.0;                                                                         \
        for (long long i = 0; i < n; ++i) {                                                                \
            double a = (double)arrayopt::sketchy_graft_at(i, g, acc, kind, b2, omb2, eps, bc2s);           \
            double x = (double)d[i];                                                                       \
            sa += a * a;                                                                                   \
            sd += x * x;                                                                                   \
        }                                                                                                  \
        part_a[0] = sa;                                                                                    \
        part_d[0] = sd;                                                                                    \
    }                                                                                                      \
    extern "C" void host_sketchy_write_##SUF(T* p, const T* g, T* acc, const T* d, T* m, long long n,     \
                                             int kind, int precond, T scale, T b2, T omb2, T eps, T bc2s,  \
                                             T b1, T w1, int nesterov, int use_m, T wd, T lr) {            \
        for (long long i = 0; i < n; ++i)                                                                  \
            arrayopt::sketchy_write_at(i, p, g, acc, d, m, kind, precond, scale, b2, omb2, eps, bc2s, b1, \
                                       w1, nesterov, use_m, wd, lr);                                       \
    }
ARRAYOPT_HOST(float, f32)
ARRAYOPT_HOST(double, f64)
#undef ARRAYOPT_HOST
#endif  // ARRAYOPT_HOST_HARNESS
