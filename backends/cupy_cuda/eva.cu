// Eva's two passes over a preconditioned weight (backends/numba_cpu/eva.py is the same step
// on the CPU; docs/eva.md (E2), (E3), (E5) the math):
//
//   eva_row_reduce:  per output row r of G (d_out x n, row-major), (G a)_r and ||G_r||^2, in
//                    column order; the host forms beta (or Eva-f's 1/(gamma + ||a||^2)), the
//                    coefficients c_r, <P, G> and the KL factor nu from them.
//   eva_apply:       the rank-one correction fused into the write of P and the SGD-momentum
//                    step of arrayopt/first_order.py, in its order of operations:
//                      d = (G - c_r a_c) * s  (s = nu/gamma);  d += wd*p;
//                      b = b*mu + d;  p -= lr * (d + mu*b if nesterov else b)  (no momentum: p -= lr*d)
//
// Layout as first_order.cu: IEEE round-to-nearest operations from rn_ops.cuh in
// __host__ __device__ functions, thin grid-stride __global__ templates, and under
// ARRAYOPT_HOST_HARNESS extern "C" host functions with the kernels' parameter lists
// (tests/test_cupy_cuda_eva.py checks them against the reference on the host).
// The row pass runs one thread per row: simple, and exact in the reference's column
// order; a warp-per-row reduction is the faster layout for wide layers.

#include "rn_ops.cuh"

namespace arrayopt {

template <typename T>
__host__ __device__ inline void eva_row_reduce_at(long long r, const T* G, const T* a, long long n,
                                                  T* rowdot, T* rowsq) {
    T s = T(0);
    T q = T(0);
    const T* row = G + r * n;
    for (long long c = 0; c < n; ++c) {
        T x = row[c];
        s = ieee::add(s, ieee::mul(x, a[c]));
        q = ieee::add(q, ieee::mul(x, x));
    }
    rowdot[r] = s;
    rowsq[r] = q;
}

template <typename T>
__host__ __device__ inline void eva_apply_at(long long i, long long n, T* p, const T* G, T* buf,
                                             const T* a, const T* coef, T scale, T lr, T mu, T wd,
                                             int nesterov, int use_buf) {
    long long r = i / n;
    long long c = i - r * n;
    T d = ieee::mul(ieee::sub(G[i], ieee::mul(coef[r], a[c])), scale);
    if (ieee::nonzero(wd)) d = ieee::add(d, ieee::mul(wd, p[i]));
    if (use_buf) {
        T b = ieee::add(ieee::mul(buf[i], mu), d);
        buf[i] = b;
        T u = nesterov ? ieee::add(d, ieee::mul(mu, b)) : b;
        p[i] = ieee::sub(p[i], ieee::mul(lr, u));
    } else {
        p[i] = ieee::sub(p[i], ieee::mul(lr, d));
    }
}

#define ARRAYOPT_GRID_STRIDE(i, n)                                                    \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);     \
         i += (long long)blockDim.x * gridDim.x)

template <typename T>
__global__ void eva_row_reduce(const T* G, const T* a, long long rows, long long n, T* rowdot, T* rowsq) {
    ARRAYOPT_GRID_STRIDE(r, rows) eva_row_reduce_at(r, G, a, n, rowdot, rowsq);
}

template <typename T>
__global__ void eva_apply(T* p, const T* G, T* buf, const T* a, const T* coef, long long rows, long long n,
                          T scale, T lr, T mu, T wd, int nesterov, int use_buf) {
    ARRAYOPT_GRID_STRIDE(i, rows * n)
        eva_apply_at(i, n, p, G, buf, a, coef, scale, lr, mu, wd, nesterov, use_buf);
}

#undef ARRAYOPT_GRID_STRIDE

#if !defined(ARRAYOPT_HOST_HARNESS)
#define ARRAYOPT_INSTANTIATE(T)                                                                   \
    template __global__ void eva_row_reduce<T>(const T*, const T*, long long, long long, T*, T*); \
    template __global__ void eva_apply<T>(T*, const T*, T*, const T*, const T*, long long,       \
                                          long long, T, T, T, T, int, int);
ARRAYOPT_INSTANTIATE(float)
ARRAYOPT_INSTANTIATE(double)
#undef ARRAYOPT_INSTANTIATE
#endif

}  // namespace arrayopt

#if defined(ARRAYOPT_HOST_HARNESS)
#define ARRAYOPT_HOST(T, SUF)                                                                     \
    extern "C" void host_eva_row_reduce_##SUF(const T* G, const T* a, long long rows, long long n, \
                                              T* rowdot, T* rowsq) {                              \
        for (long long r = 0; r < rows; ++r) arrayopt::eva_row_reduce_at(r, G, a, n, rowdot, rowsq); \
    }                                                                                             \
    extern "C" void host_eva_apply_##SUF(T* p, const T* G, T* buf, const T* a, const T* coef,     \
                                         long long rows, long long n, T scale, T lr, T mu, T wd,  \
                                         int nesterov, int use_buf) {                             \
        for (long long i = 0; i < rows * n; ++i)                                                  \
            arrayopt::eva_apply_at(i, n, p, G, buf, a, coef, scale, lr, mu, wd, nesterov, use_buf); \
    }
ARRAYOPT_HOST(float, f32)
ARRAYOPT_HOST(double, f64)
#undef ARRAYOPT_HOST
#endif  // ARRAYOPT_HOST_HARNESS
