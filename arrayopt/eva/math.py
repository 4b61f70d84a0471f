r"""Eva building blocks: Kronecker vectors, the Sherman–Morrison step, KL step-size control.

Derivations and oracles (E1)–(E8), V1–V13 are in ``docs/eva.md``.
Pure array-API functions: they run on NumPy, torch, JAX, CuPy and array-api-strict.

- Kronecker vectors (E1): ``ā = mean(a)``, ``ḡ = mean(g)`` over the batch-like axes
  (:func:`kv_linear`, :func:`kv_grad`), and for a convolution the mean of the unfolded
  input patches over batch and output positions, padding zeros included (:func:`kv_conv2d`).
- Eva (E2): ``P = (G - β ḡāᵀ)/γ``, ``β = ḡᵀGā / (γ + ‖ā‖²‖ḡ‖²)`` (:func:`eva_precondition`).
- Eva-f (E3): ``P = (G - (Gā)āᵀ/(γ + ‖ā‖²))/γ`` (:func:`eva_f_precondition`).
- Eva-s (E4): ``P = G - c·⊗ᵢsᵢ / (γ + Πᵢ‖sᵢ‖²)``, ``c = G ×₁ s₁ … ×ₖ sₖ``
  (:func:`eva_s_precondition`).
- KL clipping, re-scaling and KL normalisation (E5)–(E7) (:func:`kl_scale`).
"""

from __future__ import annotations

import math

import numpy as np

from .._xp import namespace_of

__all__ = ["kv_linear", "kv_conv2d", "kv_grad", "eva_precondition", "eva_f_precondition", "axis_means",
           "eva_s_graft_stacked", "split_stack",
           "eva_s_precondition", "kl_scale", "KL_MODES"]

KL_MODES = ("clip", "rescale", "normalize")


def _append_one(xp, a, has_bias):
    if not has_bias:
        return a
    return xp.concat([a, xp.ones((1,), dtype=a.dtype, device=_device(a))])


def _device(x):
    from .._xp import device_of

    return device_of(x)


def kv_linear(x, has_bias=False):
    """``ā`` of a linear layer (E1): the mean of its input ``x`` (``(..., d_in)``) over every
    axis but the last, with a 1 appended when the layer has a bias."""
    xp = namespace_of(x)
    if len(x.shape) < 1:
        raise ValueError("x: expected the layer input with the feature axis last, got a 0-d array")
    a = xp.mean(xp.reshape(x, (-1, x.shape[-1])), axis=0)
    return _append_one(xp, a, has_bias)


def kv_grad(dy, axes=None):
    """``ḡ`` (E1): the mean of the loss gradient w.r.t. the layer output ``dy`` over ``axes``
    (default: every axis but the last; a ``(B, C, H, W)`` convolution output takes ``(0, 2, 3)``)."""
    xp = namespace_of(dy)
    nd = len(dy.shape)
    if axes is None:
        axes = tuple(range(nd - 1))
    axes = tuple(int(ax) % nd for ax in axes) if nd else ()
    if nd == 0 or len(set(axes)) != nd - 1:
        raise ValueError(f"axes: must name every axis of dy {tuple(dy.shape)} but the output-feature axis, "
                         f"got {axes}")
    return xp.mean(dy, axis=axes)


def _pair(name, v):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return tuple(v)


def _tap_sum(xp, x, axis, offset, stride, pad, n_out):
    """Sum over output positions ``o`` of ``x[.., o·stride + offset - pad, ..]`` along ``axis``,
    the positions outside ``x`` (the zero padding) contributing nothing."""
    size = x.shape[axis]
    first = max(0, -((offset - pad) // stride))  # first o with index >= 0: ceil((pad - offset)/stride)
    last = min(n_out - 1, (size - 1 + pad - offset) // stride)  # last o with index < size
    if last < first:
        shape = list(x.shape)
        del shape[axis]
        return xp.zeros(tuple(shape), dtype=x.dtype, device=_device(x))
    start = first * stride + offset - pad
    stop = last * stride + offset - pad + 1
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop, stride)
    return xp.sum(x[tuple(index)], axis=axis)


def kv_conv2d(x, kernel_size, stride=1, padding=0, has_bias=False):
    """``ā`` of a 2-D convolution (E1): the mean over batch and output positions of the
    input patches (zero padding included), flattened in ``(C_in, k_h, k_w)`` order, the
    order of ``weight.reshape(C_out, -1)``; a 1 appended with a bias.

    ``x``: ``(B, C_in, H, W)``. Computed without unfolding: the batch mean ``x̄``, then for
    each kernel tap the sum of a strided slice of ``x̄`` (dilation 1, one group).
    """
    xp = namespace_of(x)
    if len(x.shape) != 4:
        raise ValueError(f"x: expected a (B, C_in, H, W) input, got shape {tuple(x.shape)}")
    kh, kw = _pair("kernel_size", kernel_size)
    sh, sw = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel_size/stride: must be >= 1 and padding >= 0, got {kernel_size}, {stride}, "
                         f"{padding}")
    _, c, h, w = (int(d) for d in x.shape)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x: spatial size {(h, w)} is smaller than the padded kernel {(kh, kw)}")
    xbar = xp.mean(x, axis=0)  # (C, H, W)
    taps = []
    for i in range(kh):
        rows = _tap_sum(xp, xbar, 1, i, sh, ph, ho)  # (C, W)
        taps.append(xp.stack([_tap_sum(xp, rows, 1, j, sw, pw, wo) for j in range(kw)], axis=1))  # (C, kw)
    a = xp.reshape(xp.stack(taps, axis=1), (c * kh * kw,)) / (ho * wo)
    return _append_one(xp, a, has_bias)


def eva_precondition(G, a, g, damping):
    """Eva (E2): ``P = (vvᵀ + γI)⁻¹ vec(G)`` with ``v = ā ⊗ ḡ``, by Sherman–Morrison.

    ``G``: ``(d_out, d_in)`` (a bias as the last column when ``a`` ends with the appended 1).
    Returns ``(P, ⟨P, G⟩)`` with ``⟨P, G⟩ = (‖G‖² - β ḡᵀGā)/γ``. The rank-one term is scaled
    (``β ḡ``) before the outer product is formed; ``ā ⊗ ḡ`` never is.
    """
    xp = namespace_of(G)
    Ga = G @ a
    gGa = xp.sum(g * Ga)
    beta = gGa / (damping + xp.sum(a * a) * xp.sum(g * g))
    P = (G - xp.reshape(beta * g, (-1, 1)) * xp.reshape(a, (1, -1))) / damping
    inner = (xp.sum(G * G) - beta * gGa) / damping
    return P, inner


def eva_f_precondition(G, a, damping):
    """Eva-f (E3), the vectorized FOOF: ``P = G (āāᵀ + γI)⁻¹``; returns ``(P, ⟨P, G⟩)``."""
    xp = namespace_of(G)
    Ga = G @ a
    c = 1.0 / (damping + xp.sum(a * a))
    P = (G - xp.reshape(c * Ga, (-1, 1)) * xp.reshape(a, (1, -1))) / damping
    inner = (xp.sum(G * G) - c * xp.sum(Ga * Ga)) / damping
    return P, inner


def eva_s_precondition(G, s, damping):
    """Eva-s (E4): ``P = γ (⊗ᵢ sᵢsᵢᵀ + γI)⁻¹ vec(G)`` for a ``G`` of order ``k = len(s)``
    (``vec`` row-major, so the Kronecker factors go in axis order).

    ``P = G - c·(s₁ ∘ … ∘ sₖ)/(γ + Πᵢ‖sᵢ‖²)`` with ``c = G ×₁ s₁ … ×ₖ sₖ`` (a scalar): the
    coefficient scales ``s₁`` before the outer product is formed.
    """
    xp = namespace_of(G)
    k = len(G.shape)
    if k < 1 or len(s) != k:
        raise ValueError(f"s: expected {k} vectors (one per axis of G {tuple(G.shape)}), got {len(s)}")
    c = G
    for v in s:  # contract the leading axis each time: G ×₁ s₁ ×₂ s₂ …
        c = xp.tensordot(c, v, axes=([0], [0]))
    norms = math.prod([xp.sum(v * v) for v in s])
    coef = c / (damping + norms)
    outer = xp.reshape(coef * s[0], (-1,) + (1,) * (k - 1))
    for i, v in enumerate(s[1:], start=1):
        outer = outer * xp.reshape(v, (1,) * i + (-1,) + (1,) * (k - 1 - i))
    return G - outer


def _arrays(values):
    """NumPy reductions give NumPy scalars: make them 0-d arrays (other libraries pass through)."""
    if values is None:
        return None
    return [np.asarray(v) if isinstance(v, np.generic) else v for v in values]


def kl_scale(inners, learning_rate, kl_clip, mode="clip", *, p_sq=None, g_sq=None):
    """The global factor ``ν`` that multiplies every preconditioned ``P_l`` (E5)–(E7).

    - ``"clip"``: ``s = η²Σ⟨P_l,G_l⟩``; ``ν = min(1, √(κ/s))`` (``ν = 1`` when ``s = 0``).
    - ``"rescale"``: ``ν = √(Σ‖G_l‖² / Σ‖P_l‖²)`` (pass ``p_sq`` and ``g_sq``, one per layer).
    - ``"normalize"``: ``ν = 1/√(Σ⟨P_l,G_l⟩)`` (the trust-region step, ``P̂ᵀF̂P̂ = 1``).

    ``inners``: the ``⟨P_l, G_l⟩`` (0-d arrays). ``κ = kl_clip``, ``η = learning_rate``.
    Returns a 0-d array; no Python branch on array values.
    """
    if mode not in KL_MODES:
        raise ValueError(f"mode: must be one of {list(KL_MODES)}, got {mode!r}")
    if not inners:
        raise ValueError("inners: expected one ⟨P, G⟩ per preconditioned layer, got none")
    inners, p_sq, g_sq = (_arrays(v) for v in (inners, p_sq, g_sq))
    xp = namespace_of(inners[0])
    one = xp.ones_like(inners[0])
    if mode == "rescale":
        if p_sq is None or g_sq is None or len(p_sq) != len(inners) or len(g_sq) != len(inners):
            raise ValueError("p_sq, g_sq: the rescale mode needs ‖P_l‖² and ‖G_l‖² for every layer")
        num, den = xp.sum(xp.stack(list(g_sq))), xp.sum(xp.stack(list(p_sq)))
        return xp.where(den > 0, xp.sqrt(num / xp.where(den > 0, den, one)), one)
    s = xp.sum(xp.stack(list(inners)))
    safe = xp.where(s > 0, s, one)
    if mode == "normalize":
        return xp.where(s > 0, 1.0 / xp.sqrt(safe), one)
    s = s * (learning_rate * learning_rate)
    safe = xp.where(s > 0, s, one)
    return xp.where(s > 0, xp.minimum(one, xp.sqrt(kl_clip / safe)), one)


def _stack_norm(xp, x):
    """Overflow-safe ``‖x_b‖₂`` of each item of a stack ``(B, …)`` (as :func:`arrayopt.grafting.norm`)."""
    axes = tuple(range(1, len(x.shape)))
    amax = xp.max(xp.abs(x), axis=axes, keepdims=True)
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    y = x / scale
    return xp.reshape(amax, (x.shape[0],)) * xp.sqrt(xp.sum(y * y, axis=axes))


def axis_means(xp, G):
    """``[mean_{axes ≠ i}(G_b)]_i`` of a stack ``G`` (B, d_1, …, d_k), each ``(B, d_i)``; for ``k > 2``
    the axes split in two halves, each half's means taken from the mean over the other half
    (two reads of ``G`` instead of ``k``)."""
    k = len(G.shape) - 1
    if k == 1:
        return [G]
    if k == 2:
        return [xp.mean(G, axis=2), xp.mean(G, axis=1)]
    h = k // 2
    left = xp.mean(G, axis=tuple(range(h + 1, k + 1)))
    right = xp.mean(G, axis=tuple(range(1, h + 1)))
    return axis_means(xp, left) + axis_means(xp, right)


def eva_s_graft_stacked(G, s, damping):
    """:func:`eva_s_precondition` of a stack ``G`` (B, d_1, …, d_k) with ``s[i]`` (B, d_i), grafted
    to each item's ``‖G_b‖`` (:func:`arrayopt.grafting.graft`, zero guard included): ``(B, …)``."""
    xp = namespace_of(G)
    b = int(G.shape[0])
    k = len(G.shape) - 1
    c = G
    for v in s:  # G ×₁ s₁ ×₂ s₂ … per item: (B, d_i, rest) contracted with s_i
        c = xp.matmul(v[:, None, :], xp.reshape(c, (b, int(v.shape[1]), -1)))[:, 0, :]
    c = xp.reshape(c, (b,))
    norms = xp.prod(xp.stack([xp.sum(v * v, axis=1) for v in s], axis=1), axis=1)
    coef = c / (damping + norms)
    outer = xp.reshape(coef[:, None] * s[0], (b, -1) + (1,) * (k - 1))
    for i, v in enumerate(s[1:], start=1):
        outer = outer * xp.reshape(v, (b,) + (1,) * i + (-1,) + (1,) * (k - 1 - i))
    P = G - outer
    gn, pn = _stack_norm(xp, G), _stack_norm(xp, P)
    ok = pn > 0
    scale = xp.where(ok, gn / xp.where(ok, pn, xp.ones_like(pn)), xp.zeros_like(pn))
    return P * xp.reshape(scale, (b,) + (1,) * k)


def split_stack(xp, a, n):
    """The ``n`` items of a stack (views where the namespace gives views)."""
    return [a[0, ...]] if n == 1 else list(xp.unstack(a))
