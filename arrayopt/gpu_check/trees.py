"""The parameter trees of real models, as ``name -> shape`` in ``named_parameters`` order:
ResNet-18 (62 leaves, 11,689,512 params) and GPT-2 small (148 leaves, 124,439,808 params).

The GPU check times every optimizer on them, and ``asv_bench`` (``benchmarks/real_trees.py``)
does on the CPU: real trees are where per-leaf and per-block overhead shows.
"""

from __future__ import annotations

__all__ = ["resnet18_shapes", "gpt2_shapes", "tiny_leaves_shapes", "SHAPES"]


def resnet18_shapes() -> dict:
    """``name -> shape`` of torchvision's ``resnet18()`` parameters, in ``named_parameters`` order."""
    out = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            pre = f"layer{stage}.{b}."
            first_in = c_in if b == 0 else c
            out[pre + "conv1.weight"] = (c, first_in, 3, 3)
            out[pre + "bn1.weight"] = (c,)
            out[pre + "bn1.bias"] = (c,)
            out[pre + "conv2.weight"] = (c, c, 3, 3)
            out[pre + "bn2.weight"] = (c,)
            out[pre + "bn2.bias"] = (c,)
            if b == 0 and stage > 1:
                out[pre + "downsample.0.weight"] = (c, c_in, 1, 1)
                out[pre + "downsample.1.weight"] = (c,)
                out[pre + "downsample.1.bias"] = (c,)
        c_in = c
    out["fc.weight"] = (1000, 512)
    out["fc.bias"] = (1000,)
    return out


def gpt2_shapes() -> dict:
    """``name -> shape`` of Hugging Face's ``GPT2LMHeadModel`` (small) ``transformer`` parameters
    (the tied ``lm_head`` is ``wte``)."""
    d = 768
    out = {"wte.weight": (50257, d), "wpe.weight": (1024, d)}
    for i in range(12):
        pre = f"h.{i}."
        out.update({pre + "ln_1.weight": (d,), pre + "ln_1.bias": (d,),
                    pre + "attn.c_attn.weight": (d, 3 * d), pre + "attn.c_attn.bias": (3 * d,),
                    pre + "attn.c_proj.weight": (d, d), pre + "attn.c_proj.bias": (d,),
                    pre + "ln_2.weight": (d,), pre + "ln_2.bias": (d,),
                    pre + "mlp.c_fc.weight": (d, 4 * d), pre + "mlp.c_fc.bias": (4 * d,),
                    pre + "mlp.c_proj.weight": (4 * d, d), pre + "mlp.c_proj.bias": (d,)})
    out.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return out


def tiny_leaves_shapes(leaves: int, size: int) -> dict:
    """``leaves`` 1-D leaves of ``size`` entries each (the per-leaf fixed-cost fit)."""
    return {f"b{i}": (size,) for i in range(leaves)}


SHAPES = {"resnet18": resnet18_shapes, "gpt2": gpt2_shapes}
