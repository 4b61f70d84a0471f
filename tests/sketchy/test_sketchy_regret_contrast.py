"""R10: S-AdaGrad against Ada-FD on the instance of the paper's Observation 2 (statistical, slow).

Linear losses ``f_t(x) = ⟨g_t, x⟩`` on the unit ball ``K`` of ``R^32``, ``g_t`` drawn uniformly
from ``r = 8`` orthonormal vectors, sketch rank ``k = 4`` (the paper's ``ℓ = 5 ≤ r``).
S-AdaGrad is ``ao.sketchy`` (β₂ = 1, ε = 0, no graft or momentum) at the fixed step ``η = D/√2``
of its regret bound (``D = 2``, the diameter of ``K``), followed by the generalized projection
onto ``K`` in the ``G̃_t^{1/2}``-norm of its own state. Ada-FD (Wan & Zhang) is the baseline:
``H_t = Ḡ_t^{1/2} + δI`` with a fixed ``δ`` instead of the escaped mass, and the projection in
the ``H_t``-norm. The gradients do not depend on the iterates, so both methods see the same
Frequent-Directions sketch ``Ḡ_t`` (read from the S-AdaGrad state): the only difference is
the dynamic diagonal ``ρ_{1:t}`` (inside the root) against a fixed ``δ`` (added to the roots). Math and calibration:
docs/sketchy.md ("Regret against Ada-FD: the calibration").

Calibration, seeds 0-9 of ``_contrast_run`` (T = 250, 500, …, 4000; command in that page),
with the thresholds the test asserts on seed 0:

- S-AdaGrad at ``η = D/√2``: slope of log Regret_T on log T 0.50-0.60 (assert 0.4-0.65), largest
  ``Regret_T/√T`` 1.29 (assert ≤ 1.6).
- Hyperparameters fixed in advance of the horizon (the anytime setting of the regret bound),
  ``q(T)`` = the best over the grid of ``max_{T' ≤ T} Regret_T'/√T'``: S-AdaGrad's ``q`` is flat,
  its growth exponent (slope of log q on log T) 0.000-0.005 (assert ≤ 0.03); Ada-FD's grows,
  exponent 0.136-0.197 (assert ≥ 0.08; for a pure constant step it tends to 1/4, a regret of
  ``T^{3/4}`` at the worst horizon, the rate of Observation 2), and ``q_AdaFD/q_S`` at
  T = 4000 is 2.04-2.59 (assert ≥ 1.5).
- Ada-FD re-tuned for every horizon separately: slope 0.43-0.52 (assert ≤ 0.6). Tuned per
  horizon it is gradient descent with a step ``∝ 1/√T`` and grows like ``√T`` too, so the
  contrast holds for hyperparameters fixed in advance, not for per-horizon tuning.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

DIM, DIRECTIONS, RANK, RADIUS = 32, 8, 4, 1.0
HORIZONS = (250, 500, 1000, 2000, 4000)
ADA_FD_ETAS = np.logspace(-3, 2, 11)
# S-AdaGrad: the same η grid and the η = D/√2 of its bound (D = 2R, the diameter of K)
S_ETAS = np.append(ADA_FD_ETAS, 2 * RADIUS / np.sqrt(2.0))
S_THEOREM = S_ETAS.size - 1
ADA_FD_DELTAS = np.logspace(-3, 3, 7)


def _project_to_ball(y_in, y_perp, a_in, a_perp, radius):
    """argmin_{‖x‖ ≤ R} ‖x − y‖_A for ``A = U diag(a_in) Uᵀ + a_perp (I − UUᵀ)``, batched.

    ``y_in = Uᵀy`` (…, k) and ``y_perp = ‖y − UUᵀy‖`` (…): returns the scales of ``x`` in the
    same coordinates, ``x = U (s_in·y_in) + s_perp (y − UUᵀy)``. The optimum is
    ``x(λ) = (A + λI)⁻¹A y`` with ``‖x(λ)‖ = R`` (λ = 0 when ``‖y‖ ≤ R``); Newton's method on
    ``1/R − 1/‖x(λ)‖`` (convex and decreasing in λ, ``1/‖x(λ)‖`` being concave: Moré & Sorensen's
    trust-region equation) increases from λ = 0 monotonically to the root.
    """
    a = np.concatenate([a_in, a_perp[..., None]], axis=-1)
    a = np.maximum(a, 1e-300)
    y = np.concatenate([y_in, y_perp[..., None]], axis=-1)
    c = a * y
    outside = np.linalg.norm(y, axis=-1) > radius
    lam = np.zeros(outside.shape)
    for _ in range(50):
        p = c / (a + lam[..., None])
        pn = np.linalg.norm(p, axis=-1)
        gap = np.where(outside, pn - radius, 0.0)
        if np.max(gap) <= 1e-13 * radius:
            break
        q2 = np.sum(p * p / (a + lam[..., None]), axis=-1)
        lam = lam + gap * pn * pn / (radius * np.maximum(q2, 1e-300))
    scale = a / (a + lam[..., None])
    x_norm = np.linalg.norm(scale * y, axis=-1)
    scale *= np.minimum(1.0, radius / np.maximum(x_norm, 1e-300))[..., None]  # Newton's last rounding
    return scale[..., :-1], scale[..., -1]


def _contrast_run(seed, horizons=HORIZONS):
    """Regret at each horizon of S-AdaGrad for every ``η`` of ``S_ETAS`` and of Ada-FD for every pair
    of ``ADA_FD_ETAS × ADA_FD_DELTAS``: ``(regret_s (H, len(S_ETAS)), regret_ada (H, pairs), sketch)``,
    ``sketch`` = (largest sketch eigenvalue over the run, escaped mass ``ρ_{1:T}`` at the last T).

    ``ao.sketchy`` (learning rate 1) gives the S-AdaGrad step ``G̃_t^{-1/2} g_t`` and the sketch;
    each ``η`` scales that step (the learning rate multiplies last), and every run is projected
    onto ``K`` in its own norm. All runs are advanced together, one projection call per step.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, DIRECTIONS)))[0].T  # r orthonormal rows
    draws = rng.integers(0, DIRECTIONS, max(horizons))
    ada_etas, deltas = (a.ravel() for a in np.meshgrid(ADA_FD_ETAS, ADA_FD_DELTAS, indexing="ij"))
    n_s = S_ETAS.size
    etas = np.concatenate([S_ETAS, ada_etas])[:, None]
    opt = ao.sketchy(learning_rate=1.0, rank=RANK, b2=1.0, eps=0.0, relative_eps=False, graft="none", b1=0.0)
    zeros = np.zeros(DIM)
    state = opt.init(zeros)
    x = np.zeros((etas.size, DIM))  # rows: S-AdaGrad for each η, then Ada-FD for each (η, δ)
    loss = np.zeros(etas.size)
    counts = np.zeros(DIRECTIONS)
    regret, largest = [], 0.0
    for t, j in enumerate(draws, start=1):
        g = basis[j]
        loss += x @ g
        counts[j] += 1
        u_step, state = opt.update(g, state, zeros)  # −G̃_t^{-1/2} g_t, the sketch having taken g_t
        u, sv, tail = state["eigvecs"][0][0], state["sv"][0][0], float(state["tail"][0][0][0])
        largest = max(largest, float(np.max(sv * sv)))
        g_in = u.T @ g
        h_in = sv[None, :] + deltas[:, None]  # Ada-FD: H_t = Ḡ_t^{1/2} + δI
        ada_step = (g_in / h_in - g_in / deltas[:, None]) @ u.T + g[None, :] / deltas[:, None]
        y = x - etas * np.concatenate([np.broadcast_to(-u_step, (n_s, DIM)), ada_step])
        a_in = np.concatenate([np.broadcast_to(np.sqrt(sv * sv + tail), (n_s, sv.size)), h_in])
        a_perp = np.concatenate([np.full(n_s, np.sqrt(tail)), deltas])
        y_in = y @ u
        s_in, s_perp = _project_to_ball(y_in, np.linalg.norm(y - y_in @ u.T, axis=1), a_in, a_perp, RADIUS)
        x = ((s_in - s_perp[:, None]) * y_in) @ u.T + s_perp[:, None] * y
        if t in horizons:
            assert np.all(np.linalg.norm(x, axis=1) <= RADIUS * (1 + 1e-12))  # every run plays in K
            best = -RADIUS * np.linalg.norm(counts)  # min_{‖x‖≤R} ⟨Σ g_t, x⟩, the rows being orthonormal
            regret.append(loss - best)
    regret = np.array(regret)
    return regret[:, :n_s], regret[:, n_s:], (largest, tail)


def _anytime_ratio(regret, horizons):
    """``q(T) = min over the grid of max_{T' ≤ T} Regret_T'/√T'``: the best ratio a method keeps up to
    horizon ``T`` with its hyperparameters fixed in advance (bounded iff it is ``O(√T)`` anytime)."""
    ratio = regret / np.sqrt(np.asarray(horizons, dtype=float))[:, None]
    return np.min(np.maximum.accumulate(ratio, axis=0), axis=1)


def contrast_statistics(regret_s, regret_a, horizons=HORIZONS):
    """The calibrated statistics of one run (see the module docstring)."""
    logt = np.log(np.asarray(horizons, dtype=float))
    slope = lambda v: float(np.polyfit(logt, np.log(v), 1)[0])  # noqa: E731
    q_s, q_a = _anytime_ratio(regret_s, horizons), _anytime_ratio(regret_a, horizons)
    return {
        "slope_s_theorem_eta": slope(regret_s[:, S_THEOREM]),
        "slope_a_retuned": slope(np.min(regret_a, axis=1)),
        "growth_s": slope(q_s),
        "growth_a": slope(q_a),
        "ratio_a_over_s": float(q_a[-1] / q_s[-1]),
    }


def test_generalized_projection_solves_its_lagrange_equation():
    """The projection in the ``A``-norm: ``x = (A + λI)⁻¹A y`` on the sphere, λ found by bisection."""
    rng = np.random.default_rng(11)
    a_in, a_perp = rng.uniform(1e-3, 30.0, size=(6, 4)), rng.uniform(1e-3, 30.0, size=6)
    y_in, y_perp = rng.normal(size=(6, 4)), np.abs(rng.normal(size=6))
    y_in[0] *= 0.1  # inside the ball: unchanged
    y_perp[0] = 0.1
    s_in, s_perp = _project_to_ball(y_in, y_perp, a_in, a_perp, 1.0)
    np.testing.assert_array_equal(s_in[0], 1.0)
    for b in range(1, 6):
        a, y = np.append(a_in[b], a_perp[b]), np.append(y_in[b], y_perp[b])
        lo, hi = 0.0, a.max() * np.linalg.norm(y)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.linalg.norm(a * y / (a + mid)) > 1.0 else (lo, mid)
        np.testing.assert_allclose(np.append(s_in[b], s_perp[b]), a / (a + lo), rtol=1e-9)


@pytest.mark.slow
def test_s_adagrad_regret_grows_like_sqrt_t_and_fixed_delta_ada_fd_does_not():
    """R10 (statistical, seeded; thresholds calibrated over seeds 0-9, see the module docstring)."""
    regret_s, regret_a, (largest, escaped) = _contrast_run(seed=0)
    st = contrast_statistics(regret_s, regret_a)
    # the mechanism: FD escapes nearly all of Lemma 1's budget Ω_ℓ ≤ tr G_T/ℓ = T/ℓ (0.1995-0.2000 T
    # over seeds 0-9) and keeps a small sketch (largest eigenvalue 8-15, against T/r = 500)
    T, ell = HORIZONS[-1], RANK + 1
    assert 0.19 * T <= escaped <= T / ell * (1 + 1e-12)
    assert largest <= 30.0
    assert np.all(regret_s > 0) and np.all(regret_a > 0)
    assert 0.4 <= st["slope_s_theorem_eta"] <= 0.65, st
    assert np.max(regret_s[:, S_THEOREM] / np.sqrt(HORIZONS)) <= 1.6, st
    assert st["growth_s"] <= 0.03, st
    assert st["growth_a"] >= 0.08, st
    assert st["ratio_a_over_s"] >= 1.5, st
    assert st["slope_a_retuned"] <= 0.6, st
