"""State-dict layouts (key names, order and shapes) of the official FastSAM3D and SAM-Med3D checkpoints.

The layouts are generated from a handful of numbers (:class:`Layout`), so the same code describes the official
full-size models and the tiny look-alikes the tests build. ``official_layout("fastsam3d")`` reproduces the
216 keys of ``FastSAM3D.pth`` and ``official_layout("sam-med3d")`` the 324 keys of ``sam_med3d_turbo.pth``,
in file order. Only shapes are described here: no tensors are created.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The numbers that fix a 3D SAM state-dict layout.

    ``mlp_only_blocks``: leading encoder blocks that have no attention (FastSAM3D's first two blocks).
    ``window_size``: 0 for global attention everywhere, else the window of the blocks not in
    ``global_blocks`` (their relative-position tables then have ``2 * window_size - 1`` rows).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_only_blocks: int = 0
    window_size: int = 14
    global_blocks: Tuple[int, ...] = (2, 5, 8, 11)
    grid: int = 8
    patch_size: int = 16
    mlp_ratio: int = 4
    out_chans: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    num_mask_tokens: int = 4
    iou_hidden: int = 256


#: The two architectures whose weights are published, as the official code builds them.
OFFICIAL_LAYOUTS: Dict[str, Layout] = {
    "fastsam3d": Layout(depth=6, num_heads=6, mlp_only_blocks=2, window_size=0, global_blocks=()),
    "sam-med3d": Layout(),
}

#: Human names of the architectures, used in messages.
ARCHITECTURE_TITLES: Dict[str, str] = {
    "fastsam3d": "FastSAM3D",
    "sam-med3d": "SAM-Med3D / SAM-Med3D-turbo",
}


def official_layout(architecture: str) -> Dict[str, Shape]:
    """Key -> shape of the official full-model state dict of ``architecture`` ("fastsam3d" or "sam-med3d")."""
    return full_layout(OFFICIAL_LAYOUTS[architecture])


def full_layout(layout: Layout) -> Dict[str, Shape]:
    """Key -> shape, in file order, of a whole model: image encoder, prompt encoder, mask decoder."""
    keys: Dict[str, Shape] = {}
    keys.update(_prefixed("image_encoder.", encoder_layout(layout)))
    keys.update(_prefixed("prompt_encoder.", prompt_encoder_layout(layout)))
    keys.update(_prefixed("mask_decoder.", mask_decoder_layout(layout)))
    return keys


def encoder_layout(layout: Layout) -> Dict[str, Shape]:
    """Key -> shape of the image encoder alone, without the ``image_encoder.`` prefix."""
    c, p, g = layout.embed_dim, layout.patch_size, layout.grid
    hidden = layout.mlp_ratio * c
    head_dim = c // layout.num_heads
    keys: Dict[str, Shape] = {
        "pos_embed": (1, g, g, g, c),
        "patch_embed.proj.weight": (c, 1, p, p, p),
        "patch_embed.proj.bias": (c,),
    }
    for i in range(layout.depth):
        b = f"blocks.{i}."
        if i >= layout.mlp_only_blocks:
            window = layout.window_size if (layout.window_size and i not in layout.global_blocks) else g
            keys.update({b + "norm1.weight": (c,), b + "norm1.bias": (c,)})
            for axis in "dhw":
                keys[f"{b}attn.rel_pos_{axis}"] = (2 * window - 1, head_dim)
            keys.update({b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
                         b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,)})
        keys.update({b + "norm2.weight": (c,), b + "norm2.bias": (c,),
                     b + "mlp.lin1.weight": (hidden, c), b + "mlp.lin1.bias": (hidden,),
                     b + "mlp.lin2.weight": (c, hidden), b + "mlp.lin2.bias": (c,)})
    o = layout.out_chans
    keys.update({"neck.0.weight": (o, c, 1, 1, 1), "neck.1.weight": (o,), "neck.1.bias": (o,),
                 "neck.2.weight": (o, o, 3, 3, 3), "neck.3.weight": (o,), "neck.3.bias": (o,)})
    return keys


def prompt_encoder_layout(layout: Layout) -> Dict[str, Shape]:
    """Key -> shape of the 3D prompt encoder, without the ``prompt_encoder.`` prefix."""
    d, m = layout.out_chans, layout.mask_in_chans
    q = m // 4
    return {
        "pe_layer.positional_encoding_gaussian_matrix": (3, d // 3),
        "point_embeddings.0.weight": (1, d),
        "point_embeddings.1.weight": (1, d),
        "not_a_point_embed.weight": (1, d),
        "mask_downscaling.0.weight": (q, 1, 2, 2, 2), "mask_downscaling.0.bias": (q,),
        "mask_downscaling.1.weight": (q,), "mask_downscaling.1.bias": (q,),
        "mask_downscaling.3.weight": (m, q, 2, 2, 2), "mask_downscaling.3.bias": (m,),
        "mask_downscaling.4.weight": (m,), "mask_downscaling.4.bias": (m,),
        "mask_downscaling.6.weight": (d, m, 1, 1, 1), "mask_downscaling.6.bias": (d,),
        "no_mask_embed.weight": (1, d),
    }


def mask_decoder_layout(layout: Layout) -> Dict[str, Shape]:
    """Key -> shape of the 3D mask decoder, without the ``mask_decoder.`` prefix."""
    d = layout.out_chans
    keys: Dict[str, Shape] = {}

    def attention(prefix: str, inner: int) -> None:
        for name in ("q", "k", "v"):
            keys[f"{prefix}{name}_proj.weight"] = (inner, d)
            keys[f"{prefix}{name}_proj.bias"] = (inner,)
        keys[prefix + "out_proj.weight"] = (d, inner)
        keys[prefix + "out_proj.bias"] = (d,)

    def norm(name: str) -> None:
        keys.update({name + ".weight": (d,), name + ".bias": (d,)})

    for i in range(layout.decoder_depth):
        t = f"transformer.layers.{i}."
        attention(t + "self_attn.", d)
        norm(t + "norm1")
        attention(t + "cross_attn_token_to_image.", d // 2)
        norm(t + "norm2")
        keys.update({t + "mlp.lin1.weight": (layout.decoder_mlp_dim, d), t + "mlp.lin1.bias": (layout.decoder_mlp_dim,),
                     t + "mlp.lin2.weight": (d, layout.decoder_mlp_dim), t + "mlp.lin2.bias": (d,)})
        norm(t + "norm3")
        norm(t + "norm4")
        attention(t + "cross_attn_image_to_token.", d // 2)
    attention("transformer.final_attn_token_to_image.", d // 2)
    norm("transformer.norm_final_attn")
    n = layout.num_mask_tokens
    keys.update({"iou_token.weight": (1, d), "mask_tokens.weight": (n, d),
                 "output_upscaling.0.weight": (d, d // 4, 2, 2, 2), "output_upscaling.0.bias": (d // 4,),
                 "output_upscaling.1.weight": (d // 4,), "output_upscaling.1.bias": (d // 4,),
                 "output_upscaling.3.weight": (d // 4, d // 8, 2, 2, 2), "output_upscaling.3.bias": (d // 8,)})
    for i in range(n):
        h = f"output_hypernetworks_mlps.{i}.layers."
        keys.update({h + "0.weight": (d, d), h + "0.bias": (d,), h + "1.weight": (d, d), h + "1.bias": (d,),
                     h + "2.weight": (d // 8, d), h + "2.bias": (d // 8,)})
    k = layout.iou_hidden
    keys.update({"iou_prediction_head.layers.0.weight": (k, d), "iou_prediction_head.layers.0.bias": (k,),
                 "iou_prediction_head.layers.1.weight": (k, k), "iou_prediction_head.layers.1.bias": (k,),
                 "iou_prediction_head.layers.2.weight": (n, k), "iou_prediction_head.layers.2.bias": (n,)})
    return keys


def _prefixed(prefix: str, keys: Dict[str, Shape]) -> Dict[str, Shape]:
    return {prefix + k: v for k, v in keys.items()}
