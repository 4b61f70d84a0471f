// Host harness of sonew.cu (included by it under ARRAYOPT_HOST_HARNESS, after sonew_rows.cuh):
// `host_<kernel>_<f32|f64>` with each kernel's parameter list, run on the host over the rows in
// order; the block reductions and atomics become plain sums and a max (tests, via ctypes; see
// tests/support/_cuda_host_harness.py).

#ifndef ARRAYOPT_SONEW_HOST_CUH
#define ARRAYOPT_SONEW_HOST_CUH

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
#endif  // ARRAYOPT_SONEW_HOST_CUH
