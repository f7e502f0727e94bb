"""End-to-end latency of the interactive pipeline and the 2D SAM slice-by-slice baseline.

* per model: image encoder alone, one click (prompt encoder + mask decoder), click-to-mask on the source grid
  of a 512x512x300 CT-sized volume (decode + paste back), and the first click including the encoder;
* the paper's 2D baseline: SAM ViT-B (``segment-anything``, random weights) on 1024^2 slices, timed on a few
  slices and scaled to the 128 slices of a 128^3 volume (all 128 on a GPU).
"""
import importlib.util
import sys
import types
from typing import Dict, Optional

import numpy as np
import torch

from ..geometry import Volume
from ..registry import build_model
from ..session import InteractiveSession
from .attention import measure


def ct_sized_volume(shape=(300, 512, 512), spacing=(0.8, 0.8, 1.5)) -> Volume:
    """A 512x512x300 float32 CT-like volume (air, body, a bright organ) with an offset, flipped geometry."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((j - 256) / 200.0) ** 2 + ((i - 256) / 230.0) ** 2 < 1
    organ = ((k - 150) / 40.0) ** 2 + ((j - 240) / 50.0) ** 2 + ((i - 300) / 60.0) ** 2 < 1
    array = np.where(body, 40.0, -1000.0).astype(np.float32) + np.where(organ, 120.0, 0.0).astype(np.float32)
    ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    ijk_to_ras[:3, 3] = (200.0, 180.0, -300.0)
    return Volume(array, ijk_to_ras)


def bench_model(name: str, device="cpu", repeats: int = 5, volume: Optional[Volume] = None,
                attention_backend: Optional[str] = None) -> Dict[str, object]:
    """Latencies of one registered model (random weights: speed does not depend on their values)."""
    model = build_model(name, seed=0, device=device, attention_backend=attention_backend)
    size = model.config.image_size
    x = torch.randn(1, 1, size, size, size, device=device)
    with torch.no_grad():
        encoder = measure(lambda: model.image_encoder(x), device, repeats, memory=False)
        embedding = model.image_encoder(x)
        coords = torch.tensor([[[64.0, 60.0, 70.0]]], device=device)
        labels = torch.tensor([[1]], device=device)
        previous = torch.zeros(1, 1, size // 4, size // 4, size // 4, device=device)

        def click():
            sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
            return model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)

        one_click = measure(click, device, repeats * 2)
    volume = volume if volume is not None else ct_sized_volume()
    centre = (volume.ijk_to_ras @ np.array([300.0, 240.0, 150.0, 1.0]))[:3]

    def first_click():
        InteractiveSession(model, volume).add_click(centre)

    first = measure(first_click, device, max(2, repeats // 2))
    session = InteractiveSession(model, volume)
    session.add_click(centre)
    offsets = iter(np.random.default_rng(0).uniform(-10, 10, (10_000, 3)))
    breakdown = []

    def later_click():
        result = session.add_click(centre + next(offsets), include=True)
        breakdown.append(result.timings)

    later = measure(later_click, device, repeats * 2, memory=False)
    return {
        "model": name, "encoder": encoder, "one_click_prompt_and_decoder": one_click,
        "first_click_source_grid": first, "later_click_source_grid": later,
        "later_click_paste_median_ms": 1e3 * float(np.median([b["paste"] for b in breakdown])),
        "volume_shape_kji": list(volume.shape), "process_peak_rss_mib": _peak_rss_mib(),
        "gpu_peak_allocated_mib": (torch.cuda.max_memory_allocated(device) / 2 ** 20
                                   if torch.device(device).type == "cuda" else None),
    }


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _import_sam2d_builder():
    """``segment_anything.build_sam_vit_b`` without the package's torchvision-only predictor imports."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            raise ImportError("segment-anything is not installed (pip install segment-anything)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    from segment_anything.build_sam import build_sam_vit_b

    return build_sam_vit_b


def bench_sam2d_slices(device="cpu", slices: int = 2, volume_slices: int = 128) -> Dict[str, object]:
    """2D SAM ViT-B (1024^2 input) slice by slice: time ``slices`` slices, scale to ``volume_slices``."""
    sam = _import_sam2d_builder()(checkpoint=None).to(device).eval()
    image = torch.randn(1, 3, 1024, 1024, device=device)
    coords = torch.tensor([[[512.0, 512.0]]], device=device)
    labels = torch.tensor([[1]], device=device)

    def one_slice():
        embedding = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)

    per_slice = measure(one_slice, device, repeats=slices, warmup=1, memory=False)
    return {"model": "sam-vit-b-2d", "per_slice": per_slice, "slices_timed": slices,
            "volume_slices": volume_slices, "volume_estimate_ms": per_slice["median_ms"] * volume_slices}
