// First-order optimizer kernels of arrayopt: SGD (momentum, Nesterov), Adam/AdamW, AdaGrad,
// and the non-finite counter of the finiteness pre-pass.
//
// Layout (backends/cupy_cuda/README.md, testing without a GPU):
//   1. `ieee::` (rn_ops.cuh, shared with sonew.cu) — IEEE-754 round-to-nearest
//      add/sub/mul/div/sqrt as __host__ __device__ functions. On the device they are
//      explicit PTX `.rn` instructions *without* `.ftz`, so CuPy's forced `-ftz=true`
//      (cupy/cupy#9576) neither flushes float32 subnormals nor contracts into FMA; on the
//      host the plain C operators (compile with -ffp-contract=off). Both are exactly IEEE,
//      so the device, the host harness and NumPy's reference round identically.
//   2. `*_at(i, ...)` — the per-element math of each optimizer, templated on float/double,
//      in the operation order of arrayopt/first_order.py `reference()`.
//   3. `__global__` templates: thin grid-stride loops over `*_at`, instantiated for float and
//      double (explicitly here, and by CuPy's `name_expressions`).
//   4. `#ifdef ARRAYOPT_HOST_HARNESS`: extern "C" host functions with exactly the kernels'
//      parameter lists, looping over `*_at`, for a host shared library (tests, via ctypes):
//        nvcc -shared -Xcompiler -fPIC -Xcompiler -ffp-contract=off -fmad=false \
//             -DARRAYOPT_HOST_HARNESS -o libharness.so first_order.cu
//
// Kernel parameters: (params, grads, states..., n, scalars...), where the scalars are the
// tuple of the optimizer's `step_scalars(t, lr)`, typed as the array dtype (float or double);
// SGD's `nesterov` flag is an int (0/1). `n` is a long long element count.
//
// No system headers are needed under NVRTC (CuPy's default compiler); _loader inlines
// rn_ops.cuh into the source it hands to NVRTC.

#include "rn_ops.cuh"

namespace arrayopt {

// ------------------------------------------------------------------ per-element math
//
// Each `*_at` updates element i of the params and state in place. Notation of
// arrayopt/first_order.py: d = g + wd*p (L2 decay), η = lr.

// SGD without momentum (no state):  p <- p - lr * (g + wd*p)
template <typename T>
__host__ __device__ inline void sgd_at(long long i, T* p, const T* g, T lr, T wd) {
    T gi = g[i];
    if (ieee::nonzero(wd)) gi = ieee::add(gi, ieee::mul(wd, p[i]));
    p[i] = ieee::sub(p[i], ieee::mul(lr, gi));
}

// SGD with momentum:  b <- b*mu + d;  p <- p - lr * (d + mu*b if nesterov else b)
template <typename T>
__host__ __device__ inline void sgd_momentum_at(long long i, T* p, const T* g, T* buf,
                                                T lr, T mu, T wd, int nesterov) {
    T gi = g[i];
    if (ieee::nonzero(wd)) gi = ieee::add(gi, ieee::mul(wd, p[i]));
    T b = ieee::add(ieee::mul(buf[i], mu), gi);
    buf[i] = b;
    T d = nesterov ? ieee::add(gi, ieee::mul(mu, b)) : b;
    p[i] = ieee::sub(p[i], ieee::mul(lr, d));
}

// Adam / AdamW (step_scalars of arrayopt.first_order.Adam):
//   g <- g + l2*p (Adam's L2);  p <- p*decay (AdamW's decoupled decay)
//   m <- m + (1-b1)(g - m);  v <- v*b2 + (1-b2) g^2
//   p <- p - step_size * m / (sqrt(v)/sqrt(1-b2^t) + eps),  step_size = lr/(1-b1^t)
template <typename T>
__host__ __device__ inline void adam_at(long long i, T* p, const T* g, T* m, T* v,
                                        T step_size, T omb1, T b2, T omb2, T bc2_sqrt,
                                        T eps, T l2, T decay) {
    T gi = g[i];
    T pi = p[i];
    if (ieee::nonzero(l2)) gi = ieee::add(gi, ieee::mul(l2, pi));
    if (decay != T(1)) pi = ieee::mul(pi, decay);
    T mi = ieee::add(m[i], ieee::mul(omb1, ieee::sub(gi, m[i])));
    T vi = ieee::add(ieee::mul(v[i], b2), ieee::mul(omb2, ieee::mul(gi, gi)));
    m[i] = mi;
    v[i] = vi;
    T denom = ieee::add(ieee::div(ieee::sqrt(vi), bc2_sqrt), eps);
    p[i] = ieee::sub(pi, ieee::mul(step_size, ieee::div(mi, denom)));
}

// AdaGrad:  d = g + wd*p;  s <- s + d^2;  p <- p - lr * d / (sqrt(s) + eps)
template <typename T>
__host__ __device__ inline void adagrad_at(long long i, T* p, const T* g, T* s,
                                           T lr, T eps, T wd) {
    T gi = g[i];
    if (ieee::nonzero(wd)) gi = ieee::add(gi, ieee::mul(wd, p[i]));
    T si = ieee::add(s[i], ieee::mul(gi, gi));
    s[i] = si;
    p[i] = ieee::sub(p[i], ieee::mul(lr, ieee::div(gi, ieee::add(ieee::sqrt(si), eps))));
}

// ------------------------------------------------------------------ kernels (grid-stride)
//
// Pointers are not __restrict__: a caller may pass one array as both params and grads.

#define ARRAYOPT_GRID_STRIDE(i, n)                                                    \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);     \
         i += (long long)blockDim.x * gridDim.x)

// Same scalars as sgd_momentum_step (SGD's step_scalars); mu and nesterov are unused.
template <typename T>
__global__ void sgd_step(T* p, const T* g, long long n, T lr, T mu, T wd, int nesterov) {
    ARRAYOPT_GRID_STRIDE(i, n) sgd_at(i, p, g, lr, wd);
}

template <typename T>
__global__ void sgd_momentum_step(T* p, const T* g, T* buf, long long n,
                                  T lr, T mu, T wd, int nesterov) {
    ARRAYOPT_GRID_STRIDE(i, n) sgd_momentum_at(i, p, g, buf, lr, mu, wd, nesterov);
}

template <typename T>
__global__ void adam_step(T* p, const T* g, T* m, T* v, long long n,
                          T step_size, T omb1, T b2, T omb2, T bc2_sqrt, T eps, T l2, T decay) {
    ARRAYOPT_GRID_STRIDE(i, n)
        adam_at(i, p, g, m, v, step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, decay);
}

template <typename T>
__global__ void adagrad_step(T* p, const T* g, T* s, long long n, T lr, T eps, T wd) {
    ARRAYOPT_GRID_STRIDE(i, n) adagrad_at(i, p, g, s, lr, eps, wd);
}

// Adds the number of NaN/Inf entries of x to *count: one read-only pass, at most one atomic
// per thread (only threads that saw a non-finite value), so several arrays can share one
// counter and one device-to-host read.
template <typename T>
__global__ void count_nonfinite(const T* x, long long n, unsigned long long* count) {
    unsigned long long bad = 0;
    ARRAYOPT_GRID_STRIDE(i, n) {
        if (ieee::nonfinite(x[i])) ++bad;
    }
    if (bad) atomicAdd(count, bad);
}

#undef ARRAYOPT_GRID_STRIDE

#if !defined(ARRAYOPT_HOST_HARNESS)
// Explicit instantiations, so that a plain `nvcc --cubin` compiles (and ptxas checks) every
// kernel; CuPy also names them in `name_expressions` to look up their mangled names.
#define ARRAYOPT_INSTANTIATE(T)                                                             \
    template __global__ void sgd_step<T>(T*, const T*, long long, T, T, T, int);           \
    template __global__ void sgd_momentum_step<T>(T*, const T*, T*, long long, T, T, T, int); \
    template __global__ void adam_step<T>(T*, const T*, T*, T*, long long,                 \
                                          T, T, T, T, T, T, T, T);                          \
    template __global__ void adagrad_step<T>(T*, const T*, T*, long long, T, T, T);        \
    template __global__ void count_nonfinite<T>(const T*, long long, unsigned long long*);
ARRAYOPT_INSTANTIATE(float)
ARRAYOPT_INSTANTIATE(double)
#undef ARRAYOPT_INSTANTIATE
#endif

}  // namespace arrayopt

// ------------------------------------------------------------------ host harness
#if defined(ARRAYOPT_HOST_HARNESS)
// `host_<kernel>_<f32|f64>`: the kernel's parameter list, run on the host over all n elements.
#define ARRAYOPT_HOST(T, SUF)                                                               \
    extern "C" void host_sgd_step_##SUF(T* p, const T* g, long long n, T lr, T mu, T wd,    \
                                        int nesterov) {                                     \
        for (long long i = 0; i < n; ++i) arrayopt::sgd_at(i, p, g, lr, wd);               \
    }                                                                                       \
    extern "C" void host_sgd_momentum_step_##SUF(T* p, const T* g, T* buf, long long n,     \
                                                 T lr, T mu, T wd, int nesterov) {          \
        for (long long i = 0; i < n; ++i)                                                   \
            arrayopt::sgd_momentum_at(i, p, g, buf, lr, mu, wd, nesterov);                 \
    }                                                                                       \
    extern "C" void host_adam_step_##SUF(T* p, const T* g, T* m, T* v, long long n,         \
                                         T step_size, T omb1, T b2, T omb2, T bc2_sqrt,     \
                                         T eps, T l2, T decay) {                            \
        for (long long i = 0; i < n; ++i)                                                   \
            arrayopt::adam_at(i, p, g, m, v, step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, \
                              decay);                                                       \
    }                                                                                       \
    extern "C" void host_adagrad_step_##SUF(T* p, const T* g, T* s, long long n,            \
                                            T lr, T eps, T wd) {                            \
        for (long long i = 0; i < n; ++i) arrayopt::adagrad_at(i, p, g, s, lr, eps, wd);   \
    }                                                                                       \
    extern "C" void host_count_nonfinite_##SUF(const T* x, long long n,                     \
                                               unsigned long long* count) {                 \
        unsigned long long bad = 0;                                                         \
        for (long long i = 0; i < n; ++i)                                                   \
            if (arrayopt::ieee::nonfinite(x[i])) ++bad;                                     \
        *count += bad;                                                                      \
    }
ARRAYOPT_HOST(float, f32)
ARRAYOPT_HOST(double, f64)
#undef ARRAYOPT_HOST
#endif  // ARRAYOPT_HOST_HARNESS
