"""Say what a state dict looks like, which registered model it fits, and join the older split release.

Only key names and shapes are read, so this works on meta tensors and on files of any size. The official
layouts come from :mod:`.layouts`; the names of the models that use each architecture come from the manifest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from ..errors import CheckpointError
from .layouts import ARCHITECTURE_TITLES, OFFICIAL_LAYOUTS, encoder_layout, official_layout

_VIT_2D = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
_SPLIT_HINT = ("It is the image encoder of the older split FastSAM3D release: combine it with the prompt encoder "
               "and mask decoder of a SAM-Med3D checkpoint (FastSAM3DLib.weights.combine_split_release), or "
               "download the complete model with 'python -m FastSAM3DLib download fastsam3d'.")


@dataclass(frozen=True)
class Identification:
    """What a state dict looks like.

    ``kind``: "full", "encoder-only", "prompt-decoder-only", "2d-sam" or "unknown".
    ``architecture``: "fastsam3d", "sam-med3d" or None. ``official``: keys and shapes are exactly those of the
    published checkpoint. ``fits``: registered model names that can load it as it is.
    """

    kind: str
    architecture: Optional[str]
    description: str
    official: bool
    fits: Tuple[str, ...]
    hint: str = ""

    def sentence(self) -> str:
        """One or two sentences for an error message: what the file is, which model it fits, what to do."""
        text = "Its contents are unknown" if self.kind == "unknown" else f"It looks like {self.description}"
        if self.kind == "unknown" and self.description != "unknown":
            text += self.description[len("unknown"):]
        if self.fits:
            text += ", which fits model " + " or ".join(f"'{n}'" for n in self.fits) + ": choose that model"
        elif self.kind != "unknown":
            text += ", which fits none of the registered models"
        return text + "." + (" " + self.hint if self.hint else "")


def identify_state_dict(state_dict: Mapping[str, object], manifest=None) -> Identification:
    """Describe ``state_dict`` (tensors, or anything with a ``.shape``) and name the models it fits.

    ``manifest``: where to look up which models use an architecture (the shipped manifest by default).
    """
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    prefixed = any(k.startswith("image_encoder.") for k in shapes)
    has_prompt = any(k.startswith("prompt_encoder.") for k in shapes)
    has_decoder = any(k.startswith("mask_decoder.") for k in shapes)
    encoder = _encoder_shapes(shapes, prefixed)
    if not encoder:
        if has_prompt and has_decoder:
            return Identification("prompt-decoder-only", None, "a file with only a prompt encoder and mask decoder "
                                  "(no image encoder)", False, (), "It cannot run on its own.")
        first = ", ".join(list(shapes)[:3]) or "none"
        return Identification("unknown", None, f"unknown ({len(shapes)} tensors; first keys: {first})", False, (),
                              "Use the official checkpoint for the model.")
    info = _encoder_info(encoder)
    counts = _counts(info)
    if info["is_2d"]:
        variant = _VIT_2D.get(info["width"], f"ViT (width {info['width']})")
        return Identification("2d-sam", None, f"a 2D SAM {variant} checkpoint ({counts})", False, (),
                              "2D models (SAM, MedSAM, SAM-Med2D) cannot run in this 3D plugin; use FastSAM3D or "
                              "SAM-Med3D weights.")
    arch = _architecture(info)
    full = has_prompt and has_decoder
    if full:
        official = arch is not None and shapes == dict(official_layout(arch))
    else:
        official = arch is not None and encoder == encoder_layout(OFFICIAL_LAYOUTS[arch])
    if arch is not None and not official:
        counts += f", width {info['width']}" if info["width"] != OFFICIAL_LAYOUTS[arch].embed_dim else \
            ", non-standard sizes"
    if arch is None:
        return Identification("full" if full else "encoder-only", None, "a 3D SAM-style checkpoint of an unknown "
                              f"variant ({counts}, width {info['width']})", False,
                              _registered_models_with(shapes) if full else ())
    title = ARCHITECTURE_TITLES[arch]
    if full:
        fits = _models_for(arch, manifest) if official else _registered_models_with(shapes)
        return Identification("full", arch, f"a {title} checkpoint ({counts})", official, fits)
    hint = _SPLIT_HINT if arch == "fastsam3d" else "It lacks the prompt encoder and mask decoder."
    return Identification("encoder-only", arch, f"an encoder-only {title.split(' /')[0]} file ({counts})", official,
                          (), hint)


def combine_split_release(encoder_sd: Mapping[str, object], sammed3d_sd: Mapping[str, object]) -> Dict[str, object]:
    """Join the older split FastSAM3D release into one full FastSAM3D state dict.

    ``encoder_sd``: the encoder-only FastSAM3D file (keys with or without the ``image_encoder.`` prefix).
    ``sammed3d_sd``: a SAM-Med3D-format checkpoint; only its ``prompt_encoder.*`` and ``mask_decoder.*`` are used.
    The result has the official key order. Raises CheckpointError naming what each file looks like.
    """
    enc = identify_state_dict(encoder_sd)
    if enc.kind == "full" and enc.architecture == "fastsam3d":
        raise CheckpointError(f"The encoder file is already a complete FastSAM3D checkpoint: load it directly. "
                              f"{enc.sentence()}")
    if enc.kind != "encoder-only" or enc.architecture != "fastsam3d":
        raise CheckpointError(f"The first file must be the encoder-only FastSAM3D file. {enc.sentence()}")
    dec = identify_state_dict(sammed3d_sd)
    if dec.kind not in ("full", "prompt-decoder-only") or dec.architecture == "fastsam3d":
        raise CheckpointError("The second file must be a SAM-Med3D checkpoint providing the prompt encoder and "
                              f"mask decoder. {dec.sentence()}")
    combined: Dict[str, object] = {}
    for key, value in encoder_sd.items():
        combined[key if key.startswith("image_encoder.") else "image_encoder." + key] = value
    for key, value in sammed3d_sd.items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            combined[key] = value
    order = list(official_layout("fastsam3d"))
    if set(combined) != set(order):
        missing = sorted(set(order) - set(combined))[:3]
        extra = sorted(set(combined) - set(order))[:3]
        raise CheckpointError(f"The two files do not make a FastSAM3D model (missing {missing}, extra {extra}); "
                              "use the official encoder file and a SAM-Med3D checkpoint.")
    neck = _shape(combined["image_encoder.neck.3.weight"])[0]
    prompt = _shape(combined["prompt_encoder.no_mask_embed.weight"])[-1]
    if neck != prompt:
        raise CheckpointError(f"The two files do not belong together: the encoder outputs {neck} channels but the "
                              f"prompt encoder and mask decoder expect {prompt}.")
    return {key: combined[key] for key in order}


def _shape(value) -> Tuple[int, ...]:
    shape = getattr(value, "shape", value)
    try:
        return tuple(int(n) for n in shape)
    except TypeError:
        return ()


def _encoder_shapes(shapes: Dict[str, Tuple[int, ...]], prefixed: bool) -> Dict[str, Tuple[int, ...]]:
    """The image-encoder part, without its prefix ({} when there is none)."""
    if prefixed:
        n = len("image_encoder.")
        return {k[n:]: v for k, v in shapes.items() if k.startswith("image_encoder.")}
    bare = {k: v for k, v in shapes.items() if k.startswith(("blocks.", "patch_embed.", "pos_embed", "neck."))}
    return bare if any(k.startswith("blocks.") for k in bare) else {}


def _encoder_info(encoder: Dict[str, Tuple[int, ...]]) -> dict:
    blocks = sorted({int(m.group(1)) for k in encoder for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    mlp_only = [i for i in blocks if f"blocks.{i}.attn.qkv.weight" not in encoder]
    patch = encoder.get("patch_embed.proj.weight", ())
    width = patch[0] if patch else next((v[0] for k, v in encoder.items() if k.endswith("norm2.weight") and v), 0)
    rel_h = next((v for k, v in encoder.items() if k.endswith("attn.rel_pos_h")), None)
    has_d = any(k.endswith("attn.rel_pos_d") for k in encoder)
    neck = encoder.get("neck.0.weight", ())
    is_2d = len(patch) == 4 or len(neck) == 4 or (rel_h is not None and not has_d)
    heads = width // rel_h[1] if rel_h is not None and len(rel_h) == 2 and rel_h[1] and width % rel_h[1] == 0 else None
    return {"depth": (blocks[-1] + 1) if blocks else 0, "mlp_only": mlp_only, "width": width, "heads": heads,
            "is_2d": is_2d}


def _counts(info: dict) -> str:
    text = f"{info['depth']} encoder blocks"
    return text + (f", {info['heads']} heads" if info["heads"] else "")


def _architecture(info: dict) -> Optional[str]:
    for arch, layout in OFFICIAL_LAYOUTS.items():
        if (info["depth"] == layout.depth and info["mlp_only"] == list(range(layout.mlp_only_blocks))
                and info["heads"] == layout.num_heads):
            return arch
    return None


def _registered_models_with(shapes: Mapping[str, tuple]) -> Tuple[str, ...]:
    """Names of the registered models whose state dict has exactly these keys and shapes (e.g. the bundled demo
    model, or a model trained with this library); built on PyTorch's meta device, so no weights are made."""
    import torch

    from ..model_configs import get_model_config, list_models
    from ..registry import Sam3D

    wanted = {key: tuple(shape) for key, shape in shapes.items()}
    names = []
    for name in list_models():
        with torch.device("meta"):
            model = Sam3D(get_model_config(name), "torch")
        if {key: tuple(value.shape) for key, value in model.state_dict().items()} == wanted:
            names.append(name)
    return tuple(names)


def _models_for(architecture: str, manifest) -> Tuple[str, ...]:
    """Names of the manifest models with this architecture (empty if the manifest cannot be read)."""
    from .manifest import load_manifest

    try:
        models = load_manifest(manifest).models.values()
    except CheckpointError:
        return ()
    return tuple(e.name for e in models if e.architecture == architecture)

