"""Reproduce the official parity fixtures: the deterministic weight fill, input and calls they record.

Used by the tests (and by anyone checking a new backend) to compare a model against
``shared/reference/fixtures/*.npz`` with the fixture README's recipe.
"""
import zlib
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def fill_like_fixture(model: torch.nn.Module, plus_one_keys: Iterable[str],
                      gaussian_matrix: Optional[torch.Tensor] = None) -> None:
    """Fill every floating-point state-dict entry with the crc32-seeded values of the fixture recipe."""
    plus_one = set(plus_one_keys)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
            value = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * 0.02
            tensor.copy_(value + (1.0 if name in plus_one else 0.0))
        if gaussian_matrix is not None:
            model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(gaussian_matrix)


def fixture_input() -> torch.Tensor:
    """The fixtures' input volume: ``torch.manual_seed(7); torch.randn(1, 1, 128, 128, 128)``."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(1, 1, 128, 128, 128, generator=gen)


def _mask128(low_res: torch.Tensor) -> np.ndarray:
    up = F.interpolate(low_res, size=(128, 128, 128), mode="trilinear", align_corners=False)
    return (torch.sigmoid(up) > 0.5).to(torch.uint8).numpy()


@torch.no_grad()
def run_prompt_steps(model, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                     prefix: str = "") -> Dict[str, np.ndarray]:
    """Run the fixture's prompt/decoder calls on a given image embedding; keys as in the npz files."""
    pe, dec = model.prompt_encoder, model.mask_decoder
    out: Dict[str, np.ndarray] = {}
    image_pe = pe.get_dense_pe()
    out["image_pe"] = image_pe

    def step(name, masks, multimask=False):
        sparse, dense = pe(points=(points, labels), boxes=None, masks=masks)
        low, iou = dec(image_embeddings=embedding, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=multimask)
        return sparse, dense, low, iou

    s1, d1, low1, iou1 = step("step1", None)
    out.update(step1_sparse_embeddings=s1, step1_dense_embeddings=d1, step1_low_res_masks=low1,
               step1_iou_predictions=iou1)
    _, _, mlow, miou = step("step1_multimask", None, multimask=True)
    out.update(step1_multimask_low_res_masks=mlow, step1_multimask_iou_predictions=miou)
    s2, d2, low2, iou2 = step("step2", low1)
    out.update(step2_sparse_embeddings=s2, step2_dense_embeddings=d2, step2_low_res_masks=low2,
               step2_iou_predictions=iou2)
    _, dz, lowz, iouz = step("zero", torch.zeros(1, 1, 32, 32, 32))
    out.update(step1_zeromask_dense_embeddings=dz, step1_zeromask_low_res_masks=lowz,
               step1_zeromask_iou_predictions=iouz)
    _, _, low2z, iou2z = step("from_zero", lowz)
    out.update(step2_from_zeromask_low_res_masks=low2z, step2_from_zeromask_iou_predictions=iou2z)
    result = {prefix + k: v.numpy() for k, v in out.items()}
    if not prefix:
        result["step1_mask128_uint8"] = _mask128(low1)
        result["step2_mask128_uint8"] = _mask128(low2)
        result["step1_zeromask_mask128_uint8"] = _mask128(lowz)
    return result


def relative_l2(candidate: np.ndarray, reference: np.ndarray) -> float:
    """``||candidate - reference|| / ||reference||`` in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(candidate, dtype=np.float64) - ref
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))
