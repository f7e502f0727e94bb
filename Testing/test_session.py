"""The interactive session: encoder reuse, logits feedback, undo, prompt modes, and errors that change nothing."""
import numpy as np
import pytest
import torch

from FastSAM3DLib import build_model, geometry
from FastSAM3DLib.errors import InputImageError, OutOfMemoryError, PromptError
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.session import InteractiveSession


def blob_volume(shape=(60, 70, 80), spacing=(2.0, 1.5, 1.0)):
    """A bright ellipsoid in a noisy background, with an oblique-free but anisotropic, offset geometry."""
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = ((k - 30) / 12) ** 2 + ((j - 35) / 15) ** 2 + ((i - 40) / 20) ** 2 < 1
    array = (100 + 10 * rng.standard_normal(shape) + 300 * inside).astype(np.float32)
    ijk_to_ras = np.diag([*spacing[::-1], 1.0])  # i, j, k spacings
    ijk_to_ras[:3, 3] = (-40.0, 12.0, 7.5)
    return Volume(array, ijk_to_ras)


def ras_of(volume, ijk):
    return (volume.ijk_to_ras @ np.append(np.asarray(ijk, float), 1.0))[:3]


@pytest.fixture()
def model():
    return build_model("tiny-test", seed=0)


class EncoderCalls:
    """Count image-encoder forward calls with a hook on the real module."""

    def __init__(self, model):
        self.count = 0
        model.image_encoder.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))


def manual_prediction(model, volume, roi, points_ras, labels, previous=None):
    """The session's computation spelled out with the public pieces (geometry + SAM-style calls)."""
    image = torch.from_numpy(geometry.extract_model_input(volume, roi))[None, None]
    with torch.no_grad():
        emb = model.image_encoder(image)
        coords = torch.as_tensor(roi.ras_to_model(np.asarray(points_ras)), dtype=torch.float32)[None]
        masks = previous if previous is not None else torch.zeros(1, 1, 32, 32, 32)
        sparse, dense = model.prompt_encoder(points=(coords, torch.tensor([labels])), boxes=None, masks=masks)
        logits, iou = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
    return logits, geometry.paste_back(volume, roi, logits[0, 0])


def test_first_click_equals_the_manual_pipeline(model):
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    point = ras_of(volume, (40, 35, 30))
    result = session.add_click(point)
    assert result.encoded
    _, (region, mask) = manual_prediction(model, volume, session.roi, [point], [1])
    assert result.region == region
    np.testing.assert_array_equal(result.mask, mask)
    assert result.mask.shape == tuple(s.stop - s.start for s in result.region)


def test_encoder_runs_once_per_roi_and_logits_are_fed_back(model):
    volume = blob_volume()
    calls = EncoderCalls(model)
    session = InteractiveSession(model, volume, prompt_mode="newest")
    first, second = ras_of(volume, (40, 35, 30)), ras_of(volume, (45, 33, 28))
    session.add_click(first)
    roi = session.roi
    result = session.add_click(second, include=False)
    assert calls.count == 1 and not result.encoded and session.roi == roi
    logits1, _ = manual_prediction(model, volume, roi, [first], [1])
    _, (region, mask) = manual_prediction(model, volume, roi, [second], [0], previous=logits1)
    assert calls.count == 3  # two manual encodes
    np.testing.assert_array_equal(session.full_mask(result)[region], mask)


def test_all_clicks_mode_feeds_every_click(model):
    volume = blob_volume()
    seen = []
    model.prompt_encoder.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["points"][0].shape[1]),
                                               with_kwargs=True)
    for mode, expected in (("all", [1, 2, 3]), ("newest", [1, 1, 1])):
        seen.clear()
        session = InteractiveSession(model, volume, prompt_mode=mode)
        for ijk in ((40, 35, 30), (44, 35, 30), (36, 35, 30)):
            session.add_click(ras_of(volume, ijk))
        assert seen == expected, mode


def test_default_prompt_modes_are_documented_per_model():
    assert build_model("tiny-test").config.default_prompt_mode == "all"
    from FastSAM3DLib import get_model_config
    assert get_model_config("fastsam3d").default_prompt_mode == "newest"
    with pytest.raises(ValueError, match="prompt_mode"):
        InteractiveSession(build_model("tiny-test"), prompt_mode="sometimes")


def test_click_far_away_moves_the_roi_and_reencodes(model):
    big = Volume(np.random.default_rng(1).normal(100, 20, (40, 60, 300)).astype(np.float32), np.eye(4))
    calls = EncoderCalls(model)
    session = InteractiveSession(model, big)
    session.add_click(ras_of(big, (20, 30, 20)))
    first_region = session.roi
    result = session.add_click(ras_of(big, (280, 30, 20)))  # 260 mm away: cannot share a 192 mm ROI
    assert calls.count == 2 and result.encoded and session.roi != first_region
    # the returned region covers both ROIs, so the old result outside the new ROI is cleared
    assert result.region[2].start <= 20 and result.region[2].stop >= 280


def test_undo_restores_the_previous_result_exactly(model):
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    r1 = session.add_click(ras_of(volume, (40, 35, 30)))
    session.add_click(ras_of(volume, (50, 30, 30)), include=False)
    undone = session.undo()
    np.testing.assert_array_equal(session.full_mask(undone), session.full_mask(r1))
    assert len(session.clicks) == 1
    empty = session.undo()
    assert not empty.mask.any() and empty.region == r1.region
    with pytest.raises(PromptError, match="no click"):
        session.undo()


def test_undo_after_roi_move_restores_the_old_roi(model):
    big = Volume(np.random.default_rng(2).normal(100, 20, (40, 60, 300)).astype(np.float32), np.eye(4))
    session = InteractiveSession(model, big)
    r1 = session.add_click(ras_of(big, (20, 30, 20)))
    roi1 = session.roi
    session.add_click(ras_of(big, (280, 30, 20)))
    undone = session.undo()
    assert session.roi == roi1
    np.testing.assert_array_equal(session.full_mask(undone), session.full_mask(r1))


def test_bad_clicks_change_nothing(model):
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    with pytest.raises(PromptError, match="include point"):
        session.add_click(ras_of(volume, (40, 35, 30)), include=False)
    session.add_click(ras_of(volume, (40, 35, 30)))
    with pytest.raises(PromptError, match="outside"):
        session.add_click(ras_of(volume, (40, 35, 500)))
    assert len(session.clicks) == 1
    np.testing.assert_array_equal(session.full_mask(session.undo()), np.zeros(volume.shape, bool))


def test_out_of_memory_is_reported_and_leaves_the_session_unchanged(model):
    big = Volume(np.random.default_rng(3).normal(100, 20, (40, 60, 300)).astype(np.float32), np.eye(4))
    session = InteractiveSession(model, big)
    before = session.add_click(ras_of(big, (20, 30, 20)))
    state = (session.roi, list(session.clicks))

    def exhausted(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes.")

    handle = model.image_encoder.register_forward_pre_hook(exhausted)
    with pytest.raises(OutOfMemoryError, match="Nothing was changed"):
        session.add_click(ras_of(big, (280, 30, 20)))  # far away: needs the encoder
    handle.remove()
    assert session.roi == state[0] and len(session.clicks) == 1
    np.testing.assert_array_equal(session.full_mask(session.undo())[before.region], np.zeros_like(before.mask))


def test_set_image_rejects_bad_volumes_and_keeps_the_old_one(model):
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    bad = volume.array.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputImageError):
        session.set_image(Volume(bad, volume.ijk_to_ras))
    assert session.volume is volume
    with pytest.raises(PromptError, match="image first"):
        InteractiveSession(model).add_click([0, 0, 0])
