// Eigenvalue-corrected Shampoo's elementwise step between the rotations (backends/numba_cpu/shampoo.py
// is the same step on the CPU; arrayopt/shampoo/preconditioner.py corrected_moment the reference):
//
//   shampoo_corrected_moment:  D = decay*D + weight*x^2 (in place), then x = x/(sqrt(inv_bias*D) + eps)
//                              (in place), x the block rotated into the factors' eigenbases.
//
// Layout as sketchy.cu: IEEE round-to-nearest operations from rn_ops.cuh in a __host__ __device__
// function, a thin grid-stride __global__ template, and under ARRAYOPT_HOST_HARNESS an extern "C" host
// function with the kernel's parameter list.

#include "rn_ops.cuh"

namespace arrayopt {

template <typename T>
__host__ __device__ inline void shampoo_corrected_moment_at(long long i, T* x, T* d, T decay, T weight,
                                                            T inv_bias, T eps) {
    T xi = x[i];
    T di = ieee::add(ieee::mul(d[i], decay), ieee::mul(ieee::mul(xi, xi), weight));
    d[i] = di;
    x[i] = ieee::div(xi, ieee::add(ieee::sqrt(ieee::mul(di, inv_bias)), eps));
}

template <typename T>
__global__ void shampoo_corrected_moment(T* x, T* d, long long n, T decay, T weight, T inv_bias, T eps) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        shampoo_corrected_moment_at(i, x, d, decay, weight, inv_bias, eps);
}

#if !defined(ARRAYOPT_HOST_HARNESS)
template __global__ void shampoo_corrected_moment<float>(float*, float*, long long, float, float, float, float);
template __global__ void shampoo_corrected_moment<double>(double*, double*, long long, double, double, double,
                                                          double);
#endif

}  // namespace arrayopt

#if defined(ARRAYOPT_HOST_HARNESS)
#define ARRAYOPT_HOST(T, SUF)                                                                               \
    extern "C" void host_shampoo_corrected_moment_##SUF(T* x, T* d, long long n, T decay, T weight,           \
                                                        T inv_bias, T eps) {                                 \
        for (long long i = 0; i < n; ++i)                                                                    \
            arrayopt::shampoo_corrected_moment_at(i, x, d, decay, weight, inv_bias, eps);                    \
    }
ARRAYOPT_HOST(float, f32)
ARRAYOPT_HOST(double, f64)
#undef ARRAYOPT_HOST
#endif  // ARRAYOPT_HOST_HARNESS
