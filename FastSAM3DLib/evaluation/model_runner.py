"""The model as the official evaluation calls it (``validation_student.py``): the image encoder once, then the
prompt encoder and mask decoder per click, the low-res logits upsampled as the official code upsamples them."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ModelRunner:
    """Image encoder once, then prompt encoder + mask decoder per click, as ``validation_student.py`` does."""

    def __init__(self, model) -> None:
        self.model = model
        self.size = int(model.config.image_size)
        self.spacing = float(model.config.spacing_mm)

    @property
    def device(self):
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    def encode(self, image_xyz: np.ndarray):
        """Image embedding of a (x, y, z) float32 model input."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(image_xyz, dtype=np.float32))[None, None].to(self.device)
        with torch.no_grad():
            return self.model.image_encoder(tensor)

    def decode(self, embedding, points_xyz: np.ndarray, labels: Sequence[int], previous=None):
        """(low-res logits (1, 1, s/4, s/4, s/4), predicted IoU) for the given points and previous logits."""
        import torch

        low = self.size // 4
        with torch.no_grad():
            coords = torch.as_tensor(np.asarray(points_xyz), dtype=torch.float32, device=self.device)[None]
            label_t = torch.as_tensor(list(labels), dtype=torch.int64, device=self.device)[None]
            if previous is None:
                previous = torch.zeros(1, 1, low, low, low, device=self.device)
            prompt, decoder = self.model.prompt_encoder, self.model.mask_decoder
            sparse, dense = prompt(points=(coords, label_t), boxes=None, masks=previous)
            logits, iou = decoder(image_embeddings=embedding, image_pe=prompt.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        return logits, float(iou[0, 0])

    def warm_up(self) -> None:
        """One encode and decode on a blank input, so that one-off start-up costs do not count in the timings."""
        embedding = self.encode(np.zeros((self.size,) * 3, dtype=np.float32))
        self.decode(embedding, np.full((1, 3), self.size / 2), [1])


def upsample_logits(low_res, size: int) -> np.ndarray:
    """The official ``F.interpolate(low_res, size, mode="trilinear", align_corners=False)`` as (x, y, z) numpy."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(low_res).detach().float()
    while tensor.dim() < 5:
        tensor = tensor[None]
    with torch.no_grad():
        up = F.interpolate(tensor, size=(size, size, size), mode="trilinear", align_corners=False)
    return up[0, 0].cpu().numpy()
