"""The interactive session stays bounded when clicks move the region back and forth (issue 15, item 3), refuses
NaN model output without changing anything, and says PromptError for a malformed point.

Mechanisms are asserted, not timings: what each stored tensor holds, how many regions are cached, how many
decoder runs a click costs; `make bench` measures the memory and the click times
(:mod:`FastSAM3DLib.benchmarks.session_memory`).
"""
import numpy as np
import pytest
import torch

from FastSAM3DLib import build_model
from FastSAM3DLib.benchmarks.session_memory import retained_bytes
from FastSAM3DLib.errors import FastSAM3DError, PromptError
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.session import MAX_CACHED_REGIONS, InteractiveSession, ModelOutputError

LOGITS_BYTES = 32 ** 3 * 4  # one (1, 1, 32, 32, 32) float32 grid


@pytest.fixture()
def model(one_torch_thread):
    return build_model("tiny-test", seed=0)


def long_volume(length=300, seed=4):
    """``length`` x 60 x 40 mm, 1 mm voxels: room for 192 mm regions of interest side by side along x."""
    return Volume(np.random.default_rng(seed).normal(100, 20, (40, 60, length)).astype(np.float32), np.eye(4))


def alternating(n, seed=0):
    """``n`` clicks alternating between x = 40 and x = 260 mm, each jittered by up to 2 mm."""
    rng = np.random.default_rng(seed)
    return [np.array([(40.0 if i % 2 == 0 else 260.0) + rng.uniform(-2, 2), 30 + rng.uniform(-2, 2),
                      20 + rng.uniform(-2, 2)]) for i in range(n)]


class Calls:
    """Count forward calls of a real module."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))


def stored_tensors(session):
    """Every tensor the session keeps for undo and in its region cache."""
    states = session._history + [session._state] + list(session._regions.values())
    return [s.logits for s in states if s.logits is not None]


def test_stored_logits_own_only_their_own_memory(model):
    """Each kept logit grid is a compact 131 kB tensor, not a view pinning the decoder's 4-mask output."""
    session = InteractiveSession(model, long_volume())
    for point in alternating(6):
        session.add_click(point)
    tensors = stored_tensors(session)
    assert tensors
    for tensor in tensors:
        assert tensor.shape == (1, 1, 32, 32, 32)
        assert tensor.untyped_storage().nbytes() == LOGITS_BYTES


def test_memory_grows_linearly_with_a_stated_bound_per_click(model):
    """40 alternating region moves: the session keeps at most one logit grid per click (for undo), the current
    embedding, and nothing that grows with the number of clicks times the number of moves."""
    session = InteractiveSession(model, long_volume())
    clicks = alternating(40)
    for point in clicks:
        result = session.add_click(point)
        assert result.encoded  # every click moves the region
    embedding = session._embedding[1]
    bound = len(clicks) * LOGITS_BYTES + embedding.untyped_storage().nbytes() + 64 * 1024
    assert retained_bytes(session) <= bound
    assert len(session._regions) <= MAX_CACHED_REGIONS


def test_region_cache_is_bounded(model):
    """Clicks in more regions than the cache holds: the least recently used region is dropped."""
    session = InteractiveSession(model, long_volume(length=1200))
    xs = np.arange(40.0, 1200.0, 100.0)  # 12 regions, each too far from the others to share a view
    for x in xs:
        session.add_click([x, 30.0, 20.0])
    assert len(session._regions) == MAX_CACHED_REGIONS == 8
    assert list(session._regions)[-1] == session.roi


def test_coming_back_decodes_only_the_new_click(model):
    """Returning to a region continues from its cached logits: one decoder run per click however many clicks
    were made there before (issue 15: every return replayed them all, so click time grew)."""
    session = InteractiveSession(model, long_volume())
    decoder, encoder = Calls(model.mask_decoder), Calls(model.image_encoder)
    runs = []
    for point in alternating(30):
        before = decoder.count
        session.add_click(point)
        runs.append(decoder.count - before)
    assert runs == [1] * 30 and encoder.count == 30


@pytest.mark.parametrize("mode", ["all", "newest"])
def test_continuing_from_the_cache_equals_a_fresh_session_fed_the_clicks_there(model, mode):
    """After several back-and-forth moves, the result on one side is the one a fresh session fed only that
    side's clicks (in order) gives: the cache changes the cost, never the result."""
    volume = long_volume()
    clicks = alternating(9, seed=3)
    session = InteractiveSession(model, volume, prompt_mode=mode)
    for point in clicks:
        result = session.add_click(point)
    fresh = InteractiveSession(model, volume, prompt_mode=mode)
    for point in clicks[::2]:
        expected = fresh.add_click(point)
    np.testing.assert_array_equal(session.full_mask(result)[expected.region],
                                  fresh.full_mask(expected)[expected.region])
    assert result.iou == expected.iou


def test_undo_across_moves_restores_each_result_and_voids_cached_states(model):
    volume = long_volume()
    clicks = alternating(6, seed=5)
    session = InteractiveSession(model, volume)
    masks = [session.full_mask(session.add_click(p)) for p in clicks]
    for k in range(len(clicks) - 1, 0, -1):
        np.testing.assert_array_equal(session.full_mask(session.undo()), masks[k - 1])
        alive = {id(c) for c in session.clicks}
        assert all(id(c) in alive for s in session._regions.values() for c in s.fed)
    # a new click on the far side after undoing everything there is computed from scratch, as a fresh session
    session.add_click(clicks[1])
    fresh = InteractiveSession(model, volume)
    fresh.add_click(clicks[1])
    np.testing.assert_array_equal(session.low_res_logits, fresh.low_res_logits)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_model_output_fails_the_click_and_changes_nothing(model, value):
    volume = long_volume()
    session = InteractiveSession(model, volume)
    first = session.add_click([40.0, 30.0, 20.0])
    state = (session.roi, list(session.clicks), session.low_res_logits.clone(), len(session._history))

    def corrupt(module, args, output):
        logits, iou = output
        return logits.masked_fill(torch.ones_like(logits, dtype=torch.bool), value), iou

    for point in ([45.0, 32.0, 21.0], [260.0, 30.0, 20.0]):  # same region, and a region move
        handle = model.mask_decoder.register_forward_hook(corrupt)
        with pytest.raises(ModelOutputError, match="NaN or infinity") as err:
            session.add_click(point)
        handle.remove()
        assert isinstance(err.value, FastSAM3DError)
        assert (session.roi, session.clicks, len(session._history)) == state[:2] + (state[3],)
        assert torch.equal(session.low_res_logits, state[2])
    np.testing.assert_array_equal(session.full_mask(session.undo())[first.region], np.zeros_like(first.mask))


def test_nan_weights_fail_the_click_with_a_clear_error(model):
    session = InteractiveSession(model, long_volume())
    with torch.no_grad():
        model.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.fill_(float("nan"))
    with pytest.raises(ModelOutputError, match="weights may be damaged"):
        session.add_click([40.0, 30.0, 20.0])
    assert session.clicks == [] and session.roi is None


@pytest.mark.parametrize("point", [[1.0, 2.0], [1, 2, 3, 4], "abc", None, [[1.0, 2.0, 3.0, 4.0]],
                                   [float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0], ["x", "y", "z"], {"r": 1}],
                         ids=["two", "four", "text", "none", "nested", "nan", "inf", "strings", "dict"])
def test_malformed_point_is_a_prompt_error(model, point):
    session = InteractiveSession(model, long_volume())
    with pytest.raises(PromptError, match="three"):
        session.add_click(point)
    assert session.clicks == []


def test_make_bench_reports_the_retained_memory_of_100_moves(one_torch_thread):
    """The make bench rows: 100 alternating moves keep about one logit grid per click (plus one embedding)."""
    from FastSAM3DLib.benchmarks import session_memory
    from FastSAM3DLib.benchmarks.suite import Plan, extra_benchmarks

    assert session_memory.bench_rows in extra_benchmarks()
    rows = {r["name"]: r for r in session_memory.bench_rows(Plan(), "test CPU")}
    retained = rows["session_retained_mb"]["value"]
    assert 100 * LOGITS_BYTES / 1e6 <= retained <= 100 * LOGITS_BYTES / 1e6 + 10  # 13 MB + one embedding at most
    assert rows["session_move_click_ms"]["value"] > 0
    skipped = session_memory.bench_rows(Plan(skip={"host": "dry run"}), "test CPU")
    assert all(r["value"] is None and r["skipped"] == "dry run" for r in skipped)
