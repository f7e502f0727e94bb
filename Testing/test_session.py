"""The interactive session: encoder reuse, logits feedback, undo, prompt modes, and errors that change nothing."""
import time

import numpy as np
import pytest
import torch

from FastSAM3DLib import build_model, geometry
from FastSAM3DLib.errors import InputImageError, OutOfMemoryError, PromptError
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.session import ROI_MARGIN_VOXELS, InteractiveSession


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
    assert undone.encoded is False and empty.encoded is False  # an undo runs no encoder
    with pytest.raises(PromptError, match="no click"):
        session.undo()


def test_a_session_made_without_an_image_has_no_clicks_and_says_to_load_one(model):
    """The console's way: make the session, then set_image; before that it refuses clicks with a message."""
    session = InteractiveSession(model)
    assert session.clicks == [] and session.roi is None
    with pytest.raises(PromptError, match="set_image"):
        session.add_click((0.0, 0.0, 0.0))
    with pytest.raises(PromptError, match="no click"):
        session.undo()
    volume = blob_volume()
    session.set_image(volume)
    assert session.add_click(ras_of(volume, (40, 35, 30))).voxels > 0


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


def test_a_failed_undo_changes_nothing(model, monkeypatch):
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    first = session.add_click(ras_of(volume, (40, 35, 30)))
    session.add_click(ras_of(volume, (45, 30, 30)), include=False)
    before = (list(session.clicks), session._state, len(session._history), session._shown_region)

    def exhausted(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(geometry, "paste_back", exhausted)
    with pytest.raises(OutOfMemoryError):
        session.undo()
    monkeypatch.undo()
    assert (list(session.clicks), session._state, len(session._history), session._shown_region) == before
    assert np.array_equal(session.full_mask(session.undo()), session.full_mask(first))  # the undo still works
    assert len(session.clicks) == 1


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


class PromptEncoderInputs:
    """Record the points (model voxel coordinates, or None) the real prompt encoder receives, call by call."""

    def __init__(self, model):
        self.calls = []
        model.prompt_encoder.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        points = kwargs.get("points")
        self.calls.append(None if points is None else points[0][0].detach().cpu().numpy().copy())


def long_volume(seed=4):
    """300 x 60 x 40 mm, 1 mm voxels: room for regions of interest (192 mm) side by side along x."""
    return Volume(np.random.default_rng(seed).normal(100, 20, (40, 60, 300)).astype(np.float32), np.eye(4))


@pytest.mark.parametrize("first_x, border_offset", [(60.0, 3.0), (60.0, -3.0), (150.0, 3.0), (150.0, -3.0)],
                         ids=["3-outside-high", "3-inside-high", "3-outside-low", "3-inside-low"])
def test_click_at_or_just_past_the_border_moves_the_region(model, first_x, border_offset):
    """A click a few voxels outside the model's view, or inside but within the border margin, moves the view:
    the model never gets a click outside its input or squeezed against its border (issue 19, bug 1)."""
    volume = long_volume()
    inputs = PromptEncoderInputs(model)
    session = InteractiveSession(model, volume)
    first = np.array([first_x, 30.0, 20.0])
    session.add_click(first)
    xyz = session.roi.ras_to_model(first[None])[0]
    high = first_x < 100  # move towards the far side of the volume
    border = session.roi.size[0] - 0.5 if high else -0.5  # the edge of the outer voxels
    xyz[0] = border + (border_offset if high else -border_offset)
    second = session.roi.model_to_ras_points(xyz[None])[0]
    inputs.calls.clear()
    result = session.add_click(second)
    received = np.concatenate(inputs.calls)
    assert np.all(received >= -0.5) and np.all(received <= 127.5), f"points outside the model input: {received}"
    newest = inputs.calls[-1][-1]
    np.testing.assert_allclose(newest, session.roi.ras_to_model(second[None])[0], atol=1e-4)
    distance_to_border = min(newest.min() + 0.5, 127.5 - newest.max())
    assert distance_to_border >= ROI_MARGIN_VOXELS, \
        f"the newest click is {distance_to_border:.1f} voxels from the border"
    assert result.encoded  # the image encoder ran for the new view


@pytest.mark.parametrize("mode", ["all", "newest"])
def test_coming_back_after_a_region_move_equals_a_fresh_session_fed_the_clicks_there(model, mode):
    """Click twice on one side, once far away (the view moves there), then back near the first click: the view
    moves back and the result must be what a fresh session fed the clicks of that side (in order) gives, so the
    earlier clicks there are replayed with the feedback chain, not just the newest one (issue 19, bug 2)."""
    volume = long_volume()
    near = [np.array([41.0, 30.0, 20.0]), np.array([71.0, 35.0, 22.0])]
    far = np.array([281.0, 30.0, 20.0])  # 240 mm away: the two sides cannot share one 192 mm view
    back = np.array([41.3, 30.4, 19.8])
    # the scenario: coming back gives the fresh session's view (same 1.5 mm voxel as the first click)
    assert geometry.roi_around(volume, back[None]) == geometry.roi_around(volume, near[0][None])

    session = InteractiveSession(model, volume, prompt_mode=mode)
    for point in near + [far]:
        session.add_click(point)
    moved = session.add_click(back)
    assert moved.encoded

    fresh = InteractiveSession(model, volume, prompt_mode=mode)
    for point in near:
        fresh.add_click(point)
    expected = fresh.add_click(back)
    assert not expected.encoded  # the fresh session never moved: it is the reference, not the code under test
    assert expected.mask.any()
    np.testing.assert_array_equal(session.full_mask(moved)[expected.region], fresh.full_mask(expected)[expected.region])
    assert moved.iou == expected.iou


def test_click_timings_are_measured_durations(model):
    """The encode / decode / paste times shown by the CLI, the demo and the benchmark are real durations of the
    click: present for what ran, non-negative, and together within the click's wall time."""
    volume = blob_volume()
    session = InteractiveSession(model, volume)
    for ijk, needs_encode in (((40, 35, 30), True), ((44, 35, 30), False)):
        start = time.perf_counter()
        result = session.add_click(ras_of(volume, ijk))
        wall = time.perf_counter() - start
        assert result.encoded == needs_encode
        assert set(result.timings) == ({"encode", "decode", "paste"} if needs_encode else {"decode", "paste"})
        assert all(t >= 0 for t in result.timings.values()) and sum(result.timings.values()) <= wall


def test_a_growing_sessions_timings_are_measured_durations(model):
    """The same with growth (its encoder times are summed over the regions a click encodes)."""
    volume = blob_volume()
    session = InteractiveSession(model, volume, grow=True)
    for ijk, needs_encode in (((40, 35, 30), True), ((44, 35, 30), False)):
        start = time.perf_counter()
        result = session.add_click(ras_of(volume, ijk))
        wall = time.perf_counter() - start
        assert result.encoded == needs_encode and ("encode" in result.timings) == needs_encode
        assert all(0 <= t <= wall for t in result.timings.values()), (result.timings, wall)
