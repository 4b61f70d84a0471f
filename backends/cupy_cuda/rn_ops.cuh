// IEEE-754 round-to-nearest float operations shared by the CUDA kernels of arrayopt
// (every .cu of the backend), as __host__ __device__ functions in `arrayopt::ieee`.
//
// On the device every operation is an explicit PTX instruction *without* `.ftz`: CuPy appends
// `-ftz=true` to every RawModule compile (it overrides a user `-ftz=false`, cupy/cupy#9576),
// which would flush float32 subnormals to zero in plain C++ arithmetic, comparisons,
// conversions and fabs; explicit `.rn` instructions are never flushed and never contracted
// into FMA. On the host they are the plain C operators (compile with -ffp-contract=off).
// Both are exactly IEEE, so the device, the host harness and NumPy round identically.
//
// `_loader.source_text()` inlines this header into the .cu text given to NVRTC (so CuPy's
// kernel cache key covers it and no include path is needed); nvcc finds it beside the .cu.

#ifndef ARRAYOPT_RN_OPS_CUH
#define ARRAYOPT_RN_OPS_CUH

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace arrayopt {
namespace ieee {

__host__ __device__ inline float add(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#else
    return a + b;
#endif
}
__host__ __device__ inline float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#else
    return a - b;
#endif
}
__host__ __device__ inline float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#else
    return a * b;
#endif
}
__host__ __device__ inline float div(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#else
    return a / b;
#endif
}
__host__ __device__ inline float sqrt(float a) {
#if defined(__CUDA_ARCH__)
    float r; asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a)); return r;
#else
    return ::sqrtf(a);
#endif
}
// x != 0 with IEEE semantics (NaN != 0); a bit test so that -ftz cannot turn a subnormal
// scalar into zero on the device.
__host__ __device__ inline bool nonzero(float x) {
#if defined(__CUDA_ARCH__)
    return (__float_as_uint(x) & 0x7fffffffu) != 0u;
#else
    return x != 0.0f;
#endif
}

__host__ __device__ inline double add(double a, double b) {
#if defined(__CUDA_ARCH__)
    double r; asm("add.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b)); return r;
#else
    return a + b;
#endif
}
__host__ __device__ inline double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
    double r; asm("sub.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b)); return r;
#else
    return a - b;
#endif
}
__host__ __device__ inline double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
    double r; asm("mul.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b)); return r;
#else
    return a * b;
#endif
}
__host__ __device__ inline double div(double a, double b) {
#if defined(__CUDA_ARCH__)
    double r; asm("div.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b)); return r;
#else
    return a / b;
#endif
}
__host__ __device__ inline double sqrt(double a) {
#if defined(__CUDA_ARCH__)
    double r; asm("sqrt.rn.f64 %0, %1;" : "=d"(r) : "d"(a)); return r;
#else
    return ::sqrt(a);
#endif
}
__host__ __device__ inline bool nonzero(double x) { return x != 0.0; }

// NaN or ±Inf: x - x is 0 exactly for finite x (also under -ftz: a flushed subnormal is 0).
template <typename T>
__host__ __device__ inline bool nonfinite(T x) { return sub(x, x) != T(0); }


// ---- comparisons, |x| and conversions without .ftz (used by sonew.cu)

// a > b with IEEE semantics (false when either is NaN); subnormals compare as themselves.
__host__ __device__ inline bool gt(float a, float b) {
#if defined(__CUDA_ARCH__)
    unsigned r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r) : "f"(a), "f"(b));
    return r != 0u;
#else
    return a > b;
#endif
}
__host__ __device__ inline bool gt(double a, double b) {
#if defined(__CUDA_ARCH__)
    unsigned r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f64 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r) : "d"(a), "d"(b));
    return r != 0u;
#else
    return a > b;
#endif
}
// |x| by clearing the sign bit (exact, never flushed).
__host__ __device__ inline float absval(float x) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(__float_as_uint(x) & 0x7fffffffu);
#else
    return ::fabsf(x);
#endif
}
__host__ __device__ inline double absval(double x) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(__double_as_longlong(x) & 0x7fffffffffffffffLL);
#else
    return ::fabs(x);
#endif
}
// float -> double (exact) and double -> float (round to nearest), without flushing.
__host__ __device__ inline double to_double(float x) {
#if defined(__CUDA_ARCH__)
    double r; asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x)); return r;
#else
    return (double)x;
#endif
}
__host__ __device__ inline double to_double(double x) { return x; }
template <typename T> __host__ __device__ inline T from_double(double x);
template <> __host__ __device__ inline double from_double<double>(double x) { return x; }
template <> __host__ __device__ inline float from_double<float>(double x) {
#if defined(__CUDA_ARCH__)
    float r; asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x)); return r;
#else
    return (float)x;
#endif
}

}  // namespace ieee
}  // namespace arrayopt

#endif  // ARRAYOPT_RN_OPS_CUH
