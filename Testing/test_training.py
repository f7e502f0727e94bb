"""Training: layer pairing and schedule, losses falling, exact resumption, checkpoint format, data geometry.

Everything runs on tiny configs (``tiny-test`` student, ``tiny-test-teacher``) in seconds on a CPU.
"""
import contextlib
import json
import os
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib.geometry import Volume, extract_label, extract_model_input, roi_centred_on_mask
from FastSAM3DLib.registry import build_model
from FastSAM3DLib.training import checkpoints
from FastSAM3DLib.training.augment import AugmentConfig, Augmentation, apply_augmentation, draw_augmentation
from FastSAM3DLib.training.data import CropCache, CropSampler, SampleSpec, masked_z_normalise, prepare_crops
from FastSAM3DLib.training.distill import (NECK, DistillationTask, DistillConfig, TeacherFeatureCache, active_pairs,
                                           default_layer_pairs, distill, parse_pairs)
from FastSAM3DLib.training.engine import LoopConfig, lr_factor
from FastSAM3DLib.training.finetune import FinetuneConfig, FinetuneTask, finetune, set_trainable
from FastSAM3DLib.training.interaction import mask_only_steps, next_clicks, overlap, simulate_clicks
from FastSAM3DLib.training.losses import DiceCELoss, feature_loss
from FastSAM3DLib.training.phantoms import make_phantom


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(volume: Volume, path):
    sitk.WriteImage(volume.to_sitk(), str(path))
    return path


def _synthetic_pair(tmp_path, seed=0):
    """A small oblique, anisotropic CT-like volume with two labelled blobs, written as image/label files."""
    rng = np.random.default_rng(seed)
    shape = (40, 70, 60)  # (K, J, I)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    label[((i - 25) / 12.0) ** 2 + ((j - 35) / 15.0) ** 2 + ((k - 20) / 8.0) ** 2 <= 1] = 1
    label[((i - 45) / 7.0) ** 2 + ((j - 30) / 9.0) ** 2 + ((k - 18) / 6.0) ** 2 <= 1] = 2
    image = (40 + 150 * (label == 1) - 60 * (label == 2) + rng.normal(0, 10, shape)).astype(np.int16)
    image[:, :, :4] = -1000
    matrix = np.eye(4)
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix[:3, :3] = rotation @ np.diag([-1.8, 1.6, 2.5])
    matrix[:3, 3] = (10, -20, 30)
    return (_write(Volume(image, matrix), tmp_path / "case_ct.nii.gz"),
            _write(Volume(label, matrix), tmp_path / "case_seg.nii.gz"))


@pytest.fixture(scope="module")
def crop_cache(tmp_path_factory):
    """A crop cache (margin 4, exact float32 storage) of the two structures of one synthetic pair."""
    folder = tmp_path_factory.mktemp("pairs")
    pair = _synthetic_pair(folder)
    cache = prepare_crops(folder / "cache", [pair], margin=4, min_voxels=50, float16=False, log=lambda _: None)
    assert len(cache) == 2
    return cache


def _loop(tmp_path, name, **kw):
    settings = dict(output=str(tmp_path / name), steps=4, steps_per_epoch=1, checkpoint_every=1, seed=7,
                    quiet=True, threads=1, warmup_steps=1)
    settings.update(kw)
    return LoopConfig(**settings)


def _fix_batch(task):
    """Make ``task`` draw the same batch (its first) at every step; returns that batch."""
    batch = task.sampler.batch(np.random.default_rng(0), 1)
    task.sampler.batch = lambda rng, n: batch
    return batch


def _read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- pairing


def test_default_layer_pairs_follow_the_paper():
    # student output i (after block i+1) <-> teacher output 2(i+1)-1 (after teacher block 2(i+1))
    assert default_layer_pairs(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert default_layer_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert default_layer_pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    with pytest.raises(ValueError):
        default_layer_pairs(5, 12)
    assert parse_pairs("0:1,1:3, 2:5") == [(0, 1), (1, 3), (2, 5)]
    with pytest.raises(ValueError):
        parse_pairs("0-1")


def test_progressive_schedule_adds_one_pair_every_stage():
    pairs = [(0, 1), (1, 3), (2, 5)]
    expected = {0: pairs[:1], 1: pairs[:1], 2: pairs[:2], 3: pairs[:2], 4: pairs, 5: pairs,
                6: pairs + [NECK], 7: pairs + [NECK], 50: pairs + [NECK]}
    for epoch, active in expected.items():
        assert active_pairs(epoch, pairs, stage_epochs=2) == active
    assert active_pairs(0, pairs, 2, neck_from_start=True) == [(0, 1), NECK]
    assert active_pairs(9, pairs, 2, neck_from_start=True) == pairs + [NECK]


def test_distillation_runs_the_configured_schedule(tmp_path, crop_cache):
    """The pairs matched at each step are those of the config (projections for the unequal widths)."""
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=2)
    loop = _loop(tmp_path, "distill", steps=8)
    summary = distill(config, loop, log=lambda _: None)
    steps = [r for r in _read_log(tmp_path / "distill") if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for record in steps:
        wanted = active_pairs(record["epoch"], default_layer_pairs(3, 6), 2)
        assert record["pairs"] == [p if p == NECK else f"s{p[0]}-t{p[1]}" for p in wanted]
        assert {k[5:] for k in record if k.startswith("loss_")} == set(record["pairs"])
    assert steps[-1]["pairs"] == ["s0-t1", "s1-t3", "s2-t5", "neck"]
    saved = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    # tiny-test is 48 wide, tiny-test-teacher 64: one projection per block pair, kept out of the student
    assert sorted(saved["extra_state_dict"]) == ["s0_t1.bias", "s0_t1.weight", "s1_t3.bias", "s1_t3.weight",
                                                 "s2_t5.bias", "s2_t5.weight"]
    assert not any("s0_t1" in k for k in saved["model_state_dict"])
    assert saved["args"]["pairs"] == [[0, 1], [1, 3], [2, 5]]


def test_early_stages_run_only_the_blocks_their_pairs_need(tmp_path, crop_cache):
    """Stage 1 (pair s0-t1) runs 1 student and 2 teacher blocks and no neck; its loss and gradients equal those
    computed from the full encoders; once the neck is matched, everything runs."""
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=1)
    task = DistillationTask(config, _loop(tmp_path, "depth"), torch.device("cpu"))
    batch = _fix_batch(task)
    calls = {"student": 0, "teacher": 0, "necks": 0}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    for name, model in (("student", task.model), ("teacher", task.teacher)):
        for block in model.image_encoder.blocks:
            block.register_forward_hook(counter(name))
        model.image_encoder.neck.register_forward_hook(counter("necks"))
    task.train_mode()
    loss, metrics = task.loss(0, epoch=0, rng=np.random.default_rng(0))
    assert calls == {"student": 1, "teacher": 2, "necks": 0}
    assert list(metrics) == ["loss_s0-t1"]
    loss.backward()
    truncated = {n: p.grad.clone() for n, p in task.model.image_encoder.named_parameters() if p.grad is not None}
    assert truncated and all(n.startswith(("patch_embed", "pos_embed", "blocks.0.")) for n in truncated)

    task.model.zero_grad(set_to_none=True)
    images = batch[0]
    with torch.no_grad():
        _, teacher_blocks = task.teacher.image_encoder(images, return_block_outputs=True)
    _, student_blocks = task.model.image_encoder(images, return_block_outputs=True)
    reference = task.loss_fn(task.extra["s0_t1"](student_blocks[0]), teacher_blocks[1])
    reference.backward()
    assert torch.equal(loss.detach(), reference.detach())
    for name, grad in truncated.items():
        assert torch.allclose(grad, dict(task.model.image_encoder.named_parameters())[name].grad, atol=1e-7), name

    calls.update(student=0, teacher=0, necks=0)
    task.loss(0, epoch=3, rng=np.random.default_rng(0))  # all three pairs and the neck
    assert calls == {"student": 3, "teacher": 6, "necks": 2}


def test_equal_widths_can_be_required(tmp_path, crop_cache):
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           require_equal_widths=True)
    with pytest.raises(ValueError, match="width"):
        DistillationTask(config, _loop(tmp_path, "eq"), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- losses fall


def test_distillation_loss_falls_on_a_fixed_batch(tmp_path, crop_cache):
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=1, lr=2e-3)
    task = DistillationTask(config, _loop(tmp_path, "fixed-d"), torch.device("cpu"))
    _fix_batch(task)
    optimizer = torch.optim.AdamW(task.param_groups()[0]["params"], lr=2e-3)
    task.train_mode()
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss, _ = task.loss(step, epoch=10, rng=np.random.default_rng(step))  # epoch 10: all pairs + neck
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_finetune_loss_falls_on_a_fixed_batch(crop_cache):
    torch.manual_seed(0)
    model = build_model("tiny-test", seed=0)
    set_trainable(model)
    sampler = CropSampler(crop_cache, AugmentConfig(enabled=False), shift=False)
    images, labels, _ = sampler.batch(np.random.default_rng(0), 1)
    with torch.no_grad():
        embedding = model.image_encoder(images)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(10):
        optimizer.zero_grad()
        loss, info = simulate_clicks(model, embedding, labels, DiceCELoss(), np.random.default_rng(0), num_clicks=3,
                                     loss_size=32)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------------------------- resumption


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, crop_cache, kind):
    def run(name, **kw):
        loop = _loop(tmp_path, name, **kw)
        if kind == "finetune":
            config = FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=3, unfreeze_blocks=1,
                                    loss_size=64)
            return finetune(config, loop, log=lambda _: None)
        config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                               stage_epochs=1)
        return distill(config, loop, log=lambda _: None)

    whole = run("whole")
    first = run("parts", stop_after_steps=2)
    assert first["finished"] is False and first["steps"] == 2
    assert _state(tmp_path / "parts" / "latest.pth")["step"] == 2
    second = run("parts", resume=True)
    assert second["finished"] is True and second["steps"] == 4
    a, b = _state(whole["checkpoint"]), _state(second["checkpoint"])
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 3
    for key, value in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in a.get("extra_state_dict", {}).items():
        torch.testing.assert_close(b["extra_state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    steps = [r["step"] for r in _read_log(tmp_path / "parts") if r["event"] == "step"]
    assert steps == [1, 2, 3, 4]  # each step logged once
    losses_whole = [r["loss"] for r in _read_log(tmp_path / "whole") if r["event"] == "step"]
    losses_parts = [r["loss"] for r in _read_log(tmp_path / "parts") if r["event"] == "step"]
    np.testing.assert_allclose(losses_parts, losses_whole, rtol=0, atol=1e-5)


def test_existing_run_is_not_overwritten_without_resume(tmp_path, crop_cache):
    from FastSAM3DLib.errors import FastSAM3DError

    config = FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=2, loss_size=32)
    finetune(config, _loop(tmp_path, "run", steps=1), log=lambda _: None)
    with pytest.raises(FastSAM3DError, match="--resume"):
        finetune(config, _loop(tmp_path, "run", steps=2), log=lambda _: None)
    with pytest.raises(FastSAM3DError, match="it is a finetune run, not a distill run"):
        distill(DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root)),
                _loop(tmp_path, "run", steps=2, resume=True), log=lambda _: None)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FastSAM3DError, match="afile is a file, not a folder"):
        finetune(config, _loop(tmp_path, "afile", steps=1), log=lambda _: None)
    assert (tmp_path / "afile").read_text() == "mine"
    with pytest.raises(FastSAM3DError, match="other settings"):
        finetune(FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=3, loss_size=32),
                 _loop(tmp_path, "run", steps=2, resume=True), log=lambda _: None)


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from FastSAM3DLib.weights.filelock import FileLock
FileLock(Path(sys.argv[1]) / ".train.lock").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_folder_being_trained_is_refused(tmp_path, crop_cache, monkeypatch):
    """A --resume started while the run still trained trained a second copy from step 0 into the same folder:
    an interleaved log and two processes overwriting latest.pth. It is refused, changing nothing."""
    import subprocess
    import sys
    from pathlib import Path

    from FastSAM3DLib.errors import FastSAM3DError
    from FastSAM3DLib.training import distill as distill_module

    _finetune_run(tmp_path, crop_cache, "run", steps=2, stop_after_steps=1)
    folder = tmp_path / "run"
    assert not (folder / ".train.lock").exists()  # a finished or stopped run leaves no lock
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    repo = Path(__file__).resolve().parent.parent
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder)], cwd=repo, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FastSAM3DError, match=f"Another training run is writing into .*process {holder.pid}"):
            _finetune_run(tmp_path, crop_cache, "run", steps=2, resume=True)
        built = []  # a distill task removes other runs' teacher features when it is built: refused before that
        monkeypatch.setattr(distill_module, "DistillationTask", lambda *args: built.append(args))
        with pytest.raises(FastSAM3DError, match="Another training run is writing into"):
            distill(DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root)),
                    _loop(tmp_path, "run", steps=2, resume=True), log=lambda _: None)
        assert built == []
        assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name != ".train.lock"} == before
    finally:
        holder.kill()
        holder.wait()
    if os.environ.get("FASTSAM3D_EMULATE_WINDOWS") == "1":  # no flock: a dead holder is told only by its age
        return
    assert _finetune_run(tmp_path, crop_cache, "run", steps=2, resume=True)["finished"] is True


def _finetune_run(tmp_path, crop_cache, name, messages=None, **kw):
    config = FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=2, loss_size=32)
    log = (lambda _: None) if messages is None else messages.append
    return finetune(config, _loop(tmp_path, name, **kw), log=log)


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_over(tmp_path, crop_cache):
    """No latest.pth: every step is done again, so the dead run's log lines go and --resume says so."""
    whole = _finetune_run(tmp_path, crop_cache, "whole", steps=3, steps_per_epoch=2)
    _finetune_run(tmp_path, crop_cache, "killed", steps=3, steps_per_epoch=2, stop_after_steps=2)
    (tmp_path / "killed" / "latest.pth").unlink()  # what a run killed before its first checkpoint leaves
    assert [r["step"] for r in _read_log(tmp_path / "killed") if r["event"] == "step"] == [1, 2]
    messages = []
    summary = _finetune_run(tmp_path, crop_cache, "killed", messages, steps=3, steps_per_epoch=2, resume=True)
    assert summary["finished"] is True
    assert any("nothing to resume" in m and "step 0" in m for m in messages), messages
    records, expected = _read_log(tmp_path / "killed"), _read_log(tmp_path / "whole")
    assert [(r["event"], r["step"]) for r in records] == [(r["event"], r["step"]) for r in expected]
    assert [r["event"] for r in records].count("start") == 1
    for got, want in zip(records, expected):
        for key in ("loss", "loss_mean", "steps"):
            assert got.get(key) == pytest.approx(want.get(key), abs=1e-6), (got, want)
    assert _state(whole["checkpoint"])["step"] == _state(summary["checkpoint"])["step"] == 3


def test_resuming_a_finished_run_changes_nothing(tmp_path, crop_cache):
    """--resume on a run that has done its steps appended a second "end" event with a NaN loss."""
    first = _finetune_run(tmp_path, crop_cache, "done", steps=2, steps_per_epoch=2)
    log_before = (tmp_path / "done" / "log.jsonl").read_bytes()
    messages = []
    again = _finetune_run(tmp_path, crop_cache, "done", messages, steps=2, steps_per_epoch=2, resume=True)
    assert (tmp_path / "done" / "log.jsonl").read_bytes() == log_before
    assert any("nothing to resume" in m for m in messages), messages
    assert again["finished"] is True and again["steps"] == 2 and again["loss"] == pytest.approx(first["loss"])


def test_the_epoch_record_of_a_resumed_run_equals_the_uninterrupted_one(tmp_path, crop_cache):
    """An epoch that spans the resume step counts the steps logged before it: same loss_mean and steps."""
    _finetune_run(tmp_path, crop_cache, "whole", steps=4, steps_per_epoch=3)
    _finetune_run(tmp_path, crop_cache, "parts", steps=4, steps_per_epoch=3, stop_after_steps=2)
    _finetune_run(tmp_path, crop_cache, "parts", steps=4, steps_per_epoch=3, resume=True)
    epochs = {name: [(r["step"], r["epoch"], r["steps"], r["loss_mean"]) for r in _read_log(tmp_path / name)
                     if r["event"] == "epoch"] for name in ("whole", "parts")}
    assert [e[:3] for e in epochs["whole"]] == [(3, 0, 3), (4, 1, 1)]
    assert [e[:3] for e in epochs["parts"]] == [e[:3] for e in epochs["whole"]]
    np.testing.assert_allclose([e[3] for e in epochs["parts"]], [e[3] for e in epochs["whole"]], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_official_format_and_load_strictly(tmp_path, crop_cache):
    config = FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=2, train_encoder=True,
                            loss_size=32)
    summary = finetune(config, _loop(tmp_path, "fmt", steps=2), log=lambda _: None)
    latest = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "args"} <= set(latest)
    assert isinstance(latest["args"], dict) and latest["args"]["model_name"] == "tiny-test"
    assert latest["optimizer_state_dict"]["state"]  # resumable: AdamW moments are there
    weights = torch.load(summary["weights"], map_location="cpu", weights_only=True)
    assert weights["optimizer_state_dict"] is None and weights["epoch"] == latest["epoch"]
    for path in (summary["checkpoint"], summary["weights"]):
        model = build_model("tiny-test", checkpoint=path)  # strict key and shape check
        for key, value in model.state_dict().items():
            assert torch.equal(value, latest["model_state_dict"][key]), key
    small = checkpoints.export_weights(summary["checkpoint"], tmp_path / "half.pth", torch.float16)
    assert small.stat().st_size < (tmp_path / "fmt" / "latest.pth").stat().st_size
    build_model("tiny-test", checkpoint=small)
    assert not list((tmp_path / "fmt").glob(".*tmp"))  # atomic writes leave no temporary files


def test_plain_args_have_no_objects():
    import argparse

    plain = checkpoints.plain({"ns": argparse.Namespace(a=1, b=(2, 3)), "cfg": AugmentConfig(), "p": tmp_path_like()})
    assert plain == {"ns": {"a": 1, "b": [2, 3]}, "cfg": {"enabled": True, "flip_probability": 0.5,
                                                           "scale": [0.9, 1.1], "shift": [-0.1, 0.1]},
                     "p": "x/y"}


def tmp_path_like():
    from pathlib import Path

    return Path("x/y")


def test_finetune_freezes_what_it_should():
    model = build_model("tiny-test", seed=0)
    assert set_trainable(model) == []
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    assert set_trainable(model, unfreeze_blocks=1) == ["blocks.2", "neck"]
    trainable = {n.split(".")[1] + "." + n.split(".")[2] if n.startswith("image_encoder.blocks") else n.split(".")[1]
                 for n, p in model.named_parameters() if p.requires_grad and n.startswith("image_encoder")}
    assert trainable == {"blocks.2", "neck"}
    assert set_trainable(model, train_encoder=True) == ["all"]
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------- pieces


def test_dice_ce_matches_the_monai_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8, 8), (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    inter = (p * target).sum((2, 3, 4))
    dice = 1 - (2 * inter + 1e-5) / ((p * p).sum((2, 3, 4)) + (target * target).sum((2, 3, 4)) + 1e-5)
    expected = dice.mean() + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(DiceCELoss()(logits, target), expected)
    perfect = DiceCELoss()(target * 40 - 20, target)
    assert float(perfect) < 1e-6
    assert float(feature_loss("mse")(torch.ones(3), torch.zeros(3))) == 1.0
    with pytest.raises(ValueError):
        feature_loss("nope")


def test_official_click_loop_details():
    rng = np.random.default_rng(0)
    for _ in range(50):
        steps = mask_only_steps(rng, 11)
        assert len(steps) == 2 and 2 <= steps[0] < 9 and steps[1] == 10
    truth = np.zeros((1, 16, 16, 16), bool)
    truth[0, 4:10, 4:10, 4:10] = True
    points, labels = next_clicks(truth, None, rng)  # empty prediction: a click in the object, include
    assert points.shape == (1, 1, 3) and labels.tolist() == [[1]] and truth[0][tuple(points[0, 0].astype(int))]
    logits = np.where(truth, 5.0, 0.3).astype(np.float32)  # 0.3 < 0.5: background for the click generator
    logits[0, 12:, 12:, 12:] = 2.0  # a false positive
    points, labels = next_clicks(truth, logits, rng)
    assert labels.tolist() == [[0]] and np.all(points[0, 0] >= 12)


def test_simulated_clicks_sum_the_loss_of_every_step():
    model = build_model("tiny-test", seed=0)
    labels = torch.zeros(1, 1, 128, 128, 128)
    labels[..., 50:70, 50:70, 50:70] = 1
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(1, 1, 128, 128, 128))
    calls = []

    def loss_fn(logits, target):
        calls.append(tuple(logits.shape))
        return logits.mean() * 0 + 1.0

    total, info = simulate_clicks(model, embedding, labels, loss_fn, np.random.default_rng(0), num_clicks=5,
                                  loss_size=32)
    assert float(total.detach()) == 5.0 and calls == [(1, 1, 32, 32, 32)] * 5 and 0 <= info["dice_last"] <= 1


def test_overlap_gives_dice_and_iou_per_sample():
    prediction = np.zeros((3, 4, 4), bool)
    truth = np.zeros((3, 4, 4), bool)
    prediction[0, :2], truth[0, 1:3] = True, True  # 8 and 8 voxels, 4 shared
    truth[1, 0, 0] = True  # nothing predicted
    dice, iou = overlap(prediction, truth)  # sample 2: both empty
    np.testing.assert_allclose(dice, [0.5, 0.0, 1.0])
    np.testing.assert_allclose(iou, [4 / 12, 0.0, 1.0])


def test_iou_term_is_the_weighted_squared_error_of_the_predicted_iou():
    """The IoU term adds weight x MSE(predicted IoU, actual IoU of the step's mask), summed over the steps; the
    segmentation part and the simulated clicks stay the same."""
    model = build_model("tiny-test", seed=0)
    labels = torch.zeros(1, 1, 128, 128, 128)
    labels[..., 40:80, 50:70, 45:75] = 1
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(1, 1, 128, 128, 128))
    totals, infos = {}, {}
    for weight in (0.0, 1.0, 3.0):
        total, infos[weight] = simulate_clicks(model, embedding, labels, DiceCELoss(), np.random.default_rng(4),
                                               num_clicks=4, loss_size=32, iou_weight=weight)
        totals[weight] = float(total.detach())
    term = totals[1.0] - totals[0.0]
    assert term > 0 and totals[3.0] - totals[0.0] == pytest.approx(3 * term, rel=1e-5)
    assert infos[0.0]["dice_last"] == infos[1.0]["dice_last"] and "iou_error" not in infos[0.0]
    # term = sum over the 4 steps of the squared error; the logged mean absolute error is at most its RMS
    assert 0 < infos[1.0]["iou_error"] <= (term / 4) ** 0.5 + 1e-6


def test_iou_head_only_changes_nothing_but_the_iou_head(tmp_path, crop_cache):
    """--iou-head-only: the predicted IoU learns (its error falls on a fixed batch) and every other weight, so
    every mask, stays bit-identical."""
    model = build_model("tiny-test", seed=0)
    assert set_trainable(model, iou_head_only=True) == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.iou_prediction_head.") for n in trainable)
    with pytest.raises(ValueError, match="IoU head alone"):
        set_trainable(model, unfreeze_blocks=1, iou_head_only=True)
    with pytest.raises(ValueError, match="iou_weight"):
        FinetuneTask(FinetuneConfig(model="tiny-test", data=str(crop_cache.root), iou_head_only=True),
                     _loop(tmp_path, "noweight"), torch.device("cpu"))

    config = FinetuneConfig(model="tiny-test", data=str(crop_cache.root), clicks=3, loss_size=32, lr=1e-2,
                            decoder_lr=1e-2, iou_weight=1.0, iou_head_only=True)
    task = FinetuneTask(config, _loop(tmp_path, "iou"), torch.device("cpu"))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    _fix_batch(task)
    optimizer = torch.optim.AdamW([g["params"] for g in task.param_groups()][0], lr=1e-2, weight_decay=0.1)
    assert len(task.param_groups()) == 1
    task.train_mode()
    errors, mask_losses, loss_fn = [], [], task.loss_fn
    task.loss_fn = lambda *args: mask_losses.append(1) or loss_fn(*args)
    for step in range(30):
        optimizer.zero_grad()
        loss, info = task.loss(step, 0, np.random.default_rng(1))
        loss.backward()
        optimizer.step()
        errors.append(info["iou_error"])
    assert errors[-1] < 0.5 * errors[0], errors
    assert mask_losses == []  # the segmentation loss reaches no trainable weight here: never computed
    after = task.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.iou_prediction_head.") for k in changed)


def test_crops_equal_the_inference_geometry(tmp_path, crop_cache):
    """Centred window, no augmentation: exactly extract_model_input / extract_label of the official box."""
    entry = crop_cache.entries[0]
    sampler = CropSampler(crop_cache, AugmentConfig(enabled=False), shift=False)
    image, mask = sampler.build(SampleSpec(entry.index, (crop_cache.margin,) * 3, Augmentation()))
    from FastSAM3DLib.evaluation.dataset import find_cases, load_case

    case = [c for c in find_cases(crop_cache.root.parent) if c.name == entry.case][0]
    volume, labels, _ = load_case(case)
    roi = roi_centred_on_mask(volume, labels == entry.value)
    np.testing.assert_array_equal(image, extract_model_input(volume, roi))
    np.testing.assert_array_equal(mask, extract_label(Volume(labels, volume.ijk_to_ras), roi) == entry.value)
    assert mask.sum() == entry.voxels
    with pytest.raises(ValueError):
        masked_z_normalise(np.zeros(10, np.float32))


def test_sampler_shifts_and_augments_consistently(crop_cache):
    sampler = CropSampler(crop_cache, AugmentConfig(flip_probability=1.0, scale=(2.0, 2.0), shift=(1.0, 1.0)))
    spec = sampler.draw(np.random.default_rng(3))
    assert spec.augmentation.flips == (True, True, True) and all(0 <= o <= 8 for o in spec.offset)
    image, mask = sampler.build(spec)
    plain = CropSampler(crop_cache, AugmentConfig(enabled=False))
    ref_image, ref_mask = plain.build(SampleSpec(spec.entry, spec.offset, Augmentation()))
    np.testing.assert_array_equal(mask, ref_mask[::-1, ::-1, ::-1])
    np.testing.assert_allclose(image, ref_image[::-1, ::-1, ::-1] * 2 + 1, rtol=1e-6, atol=1e-5)
    assert draw_augmentation(np.random.default_rng(0), AugmentConfig(enabled=False)) == Augmentation()
    a, b = apply_augmentation(np.ones((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), Augmentation((True, False, False)))
    assert a.dtype == np.float32 and a.flags.c_contiguous and b.flags.c_contiguous
    with pytest.raises(ValueError, match="names group.*that the crop cache does not hold"):
        CropSampler(crop_cache, group_weights={"nope": 1.0})


def test_group_weights_warn_about_unlisted_groups_and_refuse_impossible_weights(tmp_path):
    from FastSAM3DLib.training.data import parse_group_weights

    cache = prepare_crops(tmp_path / "c", [_synthetic_pair(tmp_path)], phantoms=1, per_phantom=1, margin=0,
                          min_voxels=50, log=lambda _: None)
    assert set(cache.groups()) == {"pairs", "phantom"}
    with pytest.warns(UserWarning, match=r"\['phantom'\].*never drawn"):
        sampler = CropSampler(cache, group_weights=parse_group_weights("pairs=1"))
    assert all((p == 0) == (e.group == "phantom") for p, e in zip(sampler.probabilities, cache.entries))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a group left out with weight 0 is a choice: no warning
        CropSampler(cache, group_weights=parse_group_weights("pairs=1,phantom=0"))
    for text in ("pairs=-1", "pairs=nan", "pairs=inf", "pairs=many"):
        with pytest.raises(ValueError, match="at least 0"):
            parse_group_weights(text)


def test_the_training_commands_refuse_impossible_group_weights_in_one_line(tmp_path, capsys):
    from FastSAM3DLib.cli import main

    for command in (["distill", "--teacher", "tiny-test-teacher", "--student", "tiny-test"], ["finetune"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, str(tmp_path), "-o", str(tmp_path / "out"), "--group-weights", "pairs=-1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and "at least 0, got 'pairs=-1'" in err[-1] and "Traceback" not in err[-1]
        assert not (tmp_path / "out").exists()


def test_prepare_data_refuses_unusable_sources_and_settings_in_one_line(tmp_path, capsys):
    """Manifest errors, an image given as a source, a damaged cache index and impossible numbers gave tracebacks
    (or ran and made 0 crops)."""
    from FastSAM3DLib.cli import main

    image, _label = _synthetic_pair(tmp_path)
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    (tmp_path / "cols.csv").write_text("x,y\n1,2\n")
    (tmp_path / "bytes.csv").write_bytes(b"\xff\xfe\x00")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "index.json").write_text("{x")
    runs = [(["--source", str(tmp_path / "bad.json")], "bad.json is not a readable manifest"),
            (["--source", str(tmp_path / "obj.json")], "obj.json: expected a JSON list"),
            (["--source", str(tmp_path / "cols.csv")], "needs both 'image' and 'label'"),
            (["--source", str(tmp_path / "bytes.csv")], "bytes.csv is not a readable manifest"),
            (["--source", str(image)], "neither a folder"),
            (["--phantoms", "-3"], "must be at least 0"), (["--phantoms", "1", "--margin", "-5"], "at least 0"),
            (["--phantoms", "1", "--per-phantom", "0"], "at least 1"), ([], "give at least one --source")]
    for options, message in runs:
        with pytest.raises(SystemExit) if options and options[0] != "--source" else contextlib.nullcontext():
            assert main(["prepare-data", str(tmp_path / "cache"), *options]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and message in err[-1] and "Traceback" not in "\n".join(err), (options, err)
    (tmp_path / "afile").write_text("")
    assert main(["prepare-data", str(tmp_path / "afile"), "--phantoms", "1"]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["prepare-data", str(damaged), "--phantoms", "1"]) == 2
    assert "index.json is damaged" in capsys.readouterr().err and (damaged / "index.json").read_text() == "{x"
    assert not (tmp_path / "cache").exists()


def test_prepare_crops_skips_excluded_and_resumes(tmp_path):
    pair = _synthetic_pair(tmp_path)
    cache = prepare_crops(tmp_path / "c", [pair], margin=0, min_voxels=50, exclude=["2"], log=lambda _: None)
    assert [e.value for e in cache.entries] == [1]
    again = prepare_crops(tmp_path / "c", [pair], margin=0, min_voxels=50, log=lambda _: None)
    assert [e.value for e in again.entries] == [1, 2]  # only the missing structure was added
    held_out = prepare_crops(tmp_path / "d", [pair], margin=0, exclude_cases=["case*"], log=lambda _: None)
    assert len(held_out) == 0
    assert CropCache.open(tmp_path / "c").side == 128


def test_prepare_data_that_makes_no_crop_is_an_error_that_says_why(tmp_path, capsys):
    """It printed "0 crops in CACHE" and exited 0 (the folder was never made); finetune then asked for an
    index.json."""
    from FastSAM3DLib.cli import main

    (tmp_path / "nopairs").mkdir()
    assert main(["prepare-data", str(tmp_path / "cache"), "--source", str(tmp_path / "nopairs")]) == 2
    captured = capsys.readouterr()
    assert "no image/label pairs found" in captured.out
    assert "error: no crop was made" in captured.err.strip().splitlines()[-1]


def test_two_sources_of_one_name_are_refused_and_a_bad_case_skipped(tmp_path):
    """Folders of the same name were one group: the second site's cases of the same name counted as cached (and
    were dropped); one unusable case stopped the whole run with a message naming no file."""
    from FastSAM3DLib.errors import DataSourceError

    sites = [tmp_path / site / "data" for site in ("siteA", "siteB")]
    for number, site in enumerate(sites):
        site.mkdir(parents=True)
        _synthetic_pair(site, seed=number)
    with pytest.raises(DataSourceError, match="both be the group 'data'.*siteA.*siteB"):
        prepare_crops(tmp_path / "c", sites, margin=0, min_voxels=50, log=lambda _: None)
    assert not (tmp_path / "c").exists()
    prepare_crops(tmp_path / "c", sites[:1], margin=0, min_voxels=50, log=lambda _: None)
    index = (tmp_path / "c" / "index.json").read_bytes()
    with pytest.raises(DataSourceError, match="both be the group 'data'"):  # also against an earlier run
        prepare_crops(tmp_path / "c", sites[1:], margin=0, min_voxels=50, log=lambda _: None)
    assert (tmp_path / "c" / "index.json").read_bytes() == index
    # a 4D image beside a good case: skipped with its file named, the good case cached
    image = sitk.JoinSeries([sitk.ReadImage(str(sites[0] / "case_ct.nii.gz"))] * 3)
    sitk.WriteImage(image, str(sites[0] / "a4d_ct.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(sites[0] / "case_seg.nii.gz")), str(sites[0] / "a4d_seg.nii.gz"))
    lines = []
    cache = prepare_crops(tmp_path / "d", sites[:1], margin=0, min_voxels=50, log=lines.append)
    assert sorted(e.case for e in cache.entries) == ["case_ct", "case_ct"]
    assert any("a4d_ct: skipped" in line and "a4d_ct.nii.gz" in line and "4D" in line for line in lines), lines


@pytest.mark.parametrize("options, message", [
    (["distill", "--teacher", "tiny-test-teacher", "--student", "tiny-test", "--steps-per-epoch", "0"],
     "--steps-per-epoch: must be at least 1"),
    (["distill", "--teacher", "tiny-test-teacher", "--student", "tiny-test", "--pairs", "0:99"],
     "pair 0:99 is outside"),
    (["finetune", "--model", "tiny-test", "--checkpoint-every", "0"], "--checkpoint-every: must be at least 1"),
    (["finetune", "--model", "tiny-test", "--unfreeze-blocks", "9"], "(unfreeze_blocks) must be in 0..3"),
    (["finetune", "--model", "tiny-test", "--clicks", "1"], "--clicks: must be at least 2"),
    (["finetune", "--model", "tiny-test", "--intensity-scale", "2,1"], "--intensity-scale: LOW must not exceed HIGH"),
    (["finetune", "--model", "tiny-test", "--intensity-shift", "0.1"],
     "--intensity-shift: expected two numbers LOW,HIGH"),
    (["finetune", "--model", "tiny-test", "--lr", "-1"], "--lr: must be above 0"),
    (["finetune", "--model", "tiny-test", "--loss-size", "0"], "--loss-size: must be at least 1"),
    (["finetune", "--model", "tiny-test", "--weight-decay", "nan"], "--weight-decay: must be at least 0"),
    (["finetune", "--model", "tiny-test", "--group-weights", "elsewhere=1"],
     "names group(s) ['elsewhere'] that the crop cache does not hold"),
])
def test_impossible_training_options_are_one_line_errors_before_any_output(options, message, crop_cache, tmp_path,
                                                                          capsys):
    """They were ZeroDivisionError and ValueError tracebacks (and --clicks 1 trained without any click)."""
    from FastSAM3DLib.cli import main

    command, rest = options[0], options[1:]
    output = tmp_path / "run"
    argv = [command, str(crop_cache.root), "--output", str(output), "--steps", "1", "--quiet", *rest]
    if message.startswith("--"):  # argparse's own error: usage, then one line
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not output.exists()


def test_phantoms_are_random_labelled_volumes():
    a = make_phantom(np.random.default_rng(1), max_voxels=200_000)
    b = make_phantom(np.random.default_rng(1), max_voxels=200_000)
    np.testing.assert_array_equal(a.image.array, b.image.array)  # seeded
    assert a.names and set(np.unique(a.label.array)) - {0} == set(a.names)
    assert a.image.shape == a.label.shape and np.prod(a.image.shape) <= 200_000
    spacings, directions = [], []
    for seed in range(6):
        p = make_phantom(np.random.default_rng(seed), max_voxels=100_000)
        spacings.append(np.round(p.image.spacing, 3))
        directions.append(np.round(p.image.ijk_to_ras[:3, :3] / p.image.spacing, 3))
        assert p.image.array.dtype in (np.int16, np.float32)
    assert len({tuple(s) for s in spacings}) > 1 and any(not np.allclose(np.abs(d), np.eye(3)) for d in directions)


def test_teacher_feature_cache(tmp_path):
    features = {"t1": torch.randn(1, 2, 2, 2, 4), NECK: torch.randn(1, 3, 2, 2, 2)}
    for mode in ("memory", "disk"):
        cache = TeacherFeatureCache(mode, tmp_path / mode, max_items=1)
        assert cache.get("a") is None
        cache.put("a", features)
        got = cache.get("a")
        torch.testing.assert_close(got["t1"].float(), features["t1"], atol=1e-2, rtol=1e-2)
        assert cache.hits == 1 and cache.misses == 1
    memory = TeacherFeatureCache("memory", max_items=1)
    memory.put("a", features)
    memory.put("b", features)
    assert memory.get("a") is None  # bounded
    with pytest.raises(ValueError):
        TeacherFeatureCache("disk")


def test_cached_teacher_features_serve_every_stage(tmp_path, crop_cache):
    """A stage-1 step fills the cache with every paired teacher output and the neck, so the final stage of the
    same sample is a cache hit with all its targets."""
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=1, teacher_cache="memory")
    with pytest.warns(UserWarning, match="margin 4, augmentation on"):  # random windows: it would never hit
        task = DistillationTask(config, _loop(tmp_path, "cached"), torch.device("cpu"))
    batch = _fix_batch(task)
    task.loss(0, epoch=0, rng=np.random.default_rng(0))
    assert sorted(task.cache.get(batch[2][0])) == ["neck", "t1", "t3", "t5"]
    _, metrics = task.loss(1, epoch=3, rng=np.random.default_rng(1))
    assert task.cache.hits == 2 and task.cache.misses == 1
    assert sorted(metrics) == ["loss_neck", "loss_s0-t1", "loss_s1-t3", "loss_s2-t5"]


@pytest.mark.filterwarnings("ignore:the teacher cache hits only")
def test_a_cached_and_a_fresh_teacher_target_are_the_same(tmp_path, crop_cache):
    """With a teacher cache the targets are its float16-rounded features whether the sample was cached or not,
    so a resumed run (its memory cache empty) gets the targets the uninterrupted run got."""
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=1, teacher_cache="memory")
    task = DistillationTask(config, _loop(tmp_path, "cached"), torch.device("cpu"))
    images, _, keys = task.sampler.batch(np.random.default_rng(0), 1)
    fresh = task.teacher_features(images, keys)
    again = task.teacher_features(images, keys)
    assert task.cache.misses == 1 and task.cache.hits == 1
    for name in fresh:
        assert torch.equal(fresh[name], again[name]), name


def _teacher_file(path, seed):
    """A tiny-test-teacher checkpoint of its own weights (official layout)."""
    torch.save({"model_state_dict": build_model("tiny-test-teacher", seed=seed).state_dict()}, path)
    return str(path)


@pytest.mark.filterwarnings("ignore:the teacher cache hits only")
def test_a_disk_teacher_cache_serves_only_its_own_teacher(tmp_path, crop_cache):
    """Features left on disk by a run of another teacher (killed before its first checkpoint, so no settings
    check) are never served; the same teacher reuses its features, with or without a checkpoint."""
    def task(teacher_checkpoint=None):
        config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                               stage_epochs=1, teacher_cache="disk", teacher_checkpoint=teacher_checkpoint)
        return DistillationTask(config, _loop(tmp_path, "run"), torch.device("cpu"))

    first = task()
    images, _, keys = first.sampler.batch(np.random.default_rng(0), 1)
    features_a = first.teacher_features(images, keys)
    assert first.cache.misses == 1
    again = task()  # the same teacher, no checkpoint yet: its features are still good
    again.teacher_features(images, keys)
    assert again.cache.hits == 1 and again.cache.misses == 0
    other = task(_teacher_file(tmp_path / "teacher_b.pth", seed=5))
    features_b = other.teacher_features(images, keys)
    with torch.no_grad():
        neck_b, _ = other.teacher.image_encoder(images, return_block_outputs=True)  # teacher B's own features
    assert not torch.allclose(features_a[NECK], neck_b, rtol=0, atol=1e-2)
    torch.testing.assert_close(features_b[NECK], neck_b, rtol=0, atol=1e-2)
    assert other.cache.hits == 0 and other.cache.misses == 1
    assert again.cache.folder == first.cache.folder and not again.stale_features
    assert other.cache.folder != first.cache.folder  # teacher A's features are removed: no checkpoint needs them
    assert other.stale_features == [first.cache.folder.name] and not first.cache.folder.exists()
    (tmp_path / "run" / "latest.pth").write_bytes(b"")  # a resumed run of teacher B keeps and reuses its cache
    resumed = task(str(tmp_path / "teacher_b.pth"))
    assert resumed.cache.folder == other.cache.folder and not resumed.stale_features
    resumed.teacher_features(images, keys)
    assert resumed.cache.hits == 1


def test_resuming_with_other_teacher_weights_under_the_same_name_is_refused(tmp_path, crop_cache):
    from FastSAM3DLib.errors import FastSAM3DError

    teacher = _teacher_file(tmp_path / "teacher.pth", seed=5)
    config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                           stage_epochs=1, teacher_checkpoint=teacher)
    distill(config, _loop(tmp_path, "run", steps=2, stop_after_steps=1), log=lambda _: None)
    _teacher_file(teacher, seed=6)  # the file was replaced by another teacher
    with pytest.raises(FastSAM3DError, match="teacher_weights"):
        distill(config, _loop(tmp_path, "run", steps=2, resume=True), log=lambda _: None)


def test_resuming_with_a_setting_that_changes_the_schedule_is_refused(tmp_path, crop_cache):
    from FastSAM3DLib.errors import FastSAM3DError

    def run(**kw):
        config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                               stage_epochs=1, neck_from_start=kw.pop("neck_from_start", False),
                               lr=kw.pop("lr", 8e-4))
        return distill(config, _loop(tmp_path, "run", **kw), log=lambda _: None)

    run(steps=4, stop_after_steps=2)
    with pytest.raises(FastSAM3DError, match="neck_from_start"):
        run(steps=4, resume=True, neck_from_start=True)
    with pytest.raises(FastSAM3DError, match="steps_per_epoch"):
        run(steps=4, resume=True, steps_per_epoch=2)
    # the optimizer's settings come back from the checkpoint: other ones were silently ignored
    for changed in (dict(lr=5e-3), dict(weight_decay=0.0), dict(warmup_steps=2), dict(schedule="constant"),
                    dict(grad_clip=0.0)):
        with pytest.raises(FastSAM3DError, match="optimisation"):
            run(steps=4, resume=True, **changed)
    assert run(steps=4, resume=True)["finished"] is True


def test_float16_crops_only_where_exact_enough():
    from FastSAM3DLib.training.data import float16_exact_enough

    rng = np.random.default_rng(0)
    assert float16_exact_enough(rng.integers(-1024, 3071, (16, 16, 16)).astype(np.float32))  # CT
    assert float16_exact_enough(rng.normal(300, 80, (16, 16, 16)).astype(np.float32))  # MR
    assert not float16_exact_enough(rng.uniform(0, 3e-5, (16, 16, 16)).astype(np.float32))  # ADC-like, tiny
    assert not float16_exact_enough(np.full((4, 4, 4), 70000.0, np.float32))  # past float16's range


def test_a_crop_cache_stopped_inside_a_phantom_is_completed_on_resume(tmp_path, monkeypatch):
    from FastSAM3DLib.training import data, phantoms

    small = phantoms.make_phantom
    monkeypatch.setattr(phantoms, "make_phantom", lambda rng: small(rng, max_voxels=60_000))
    settings = dict(phantoms=3, size=32, margin=0, min_voxels=20, per_phantom=2, seed=0, log=lambda _: None)
    whole = prepare_crops(tmp_path / "whole", **settings)
    add = data.CropCache.add

    def stop_inside_phantom_1(self, group, case, *args):
        entry = add(self, group, case, *args)
        if case.endswith("00001"):
            raise KeyboardInterrupt  # the run is killed after the first of that phantom's crops
        return entry

    monkeypatch.setattr(data.CropCache, "add", stop_inside_phantom_1)
    with pytest.raises(KeyboardInterrupt):
        prepare_crops(tmp_path / "parts", **settings)
    monkeypatch.setattr(data.CropCache, "add", add)
    resumed = prepare_crops(tmp_path / "parts", **settings)
    assert len(whole) == 6
    assert sorted((e.case, e.value) for e in resumed.entries) == sorted((e.case, e.value) for e in whole.entries)


def test_learning_rate_schedule():
    config = LoopConfig(output="x", steps=10, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and factors[-1] > 0.1
    assert lr_factor(5, LoopConfig(output="x", schedule="constant")) == 1.0


def test_cli_commands_end_to_end(tmp_path, capsys):
    from FastSAM3DLib.cli import main

    image, label = _synthetic_pair(tmp_path)
    cache = tmp_path / "cache"
    assert main(["prepare-data", str(cache), "--source", str(tmp_path), "--min-voxels", "50", "--margin", "2"]) == 0
    common = ["--steps", "2", "--steps-per-epoch", "1", "--quiet", "--threads", "1"]
    assert main(["finetune", str(cache), "--model", "tiny-test-teacher", "--train-encoder", "--clicks", "2",
                 "--loss-size", "32", "--output", str(tmp_path / "teacher"), *common]) == 0
    assert main(["distill", str(cache), "--teacher", "tiny-test-teacher", "--teacher-checkpoint",
                 str(tmp_path / "teacher" / "model.pth"), "--student", "tiny-test", "--stage-epochs", "1",
                 "--output", str(tmp_path / "student"), *common]) == 0
    assert main(["finetune", str(cache), "--model", "tiny-test", "--checkpoint",
                 str(tmp_path / "student" / "model.pth"), "--clicks", "2", "--loss-size", "32", "--output",
                 str(tmp_path / "final"), *common]) == 0
    latest = tmp_path / "final" / "latest.pth"
    before = latest.read_bytes()
    os.mkfifo(tmp_path / "pipe.pth")
    for output, message in ((latest, "is the checkpoint"), (tmp_path / "w.safetensors", "must end in .pth or .pt"),
                            (tmp_path / "pipe.pth", "special file")):
        capsys.readouterr()
        assert main(["export-weights", str(latest), str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert latest.read_bytes() == before and (tmp_path / "pipe.pth").is_fifo()  # the resumable run is intact
    assert not (tmp_path / "w.safetensors").exists()
    assert main(["export-weights", str(latest), str(tmp_path / "w.pth")]) == 0
    build_model("tiny-test", checkpoint=tmp_path / "w.pth")
    # the student started from the teacher's prompt encoder and mask decoder (same shapes)
    teacher = torch.load(tmp_path / "teacher" / "model.pth", weights_only=True)["model_state_dict"]
    student = torch.load(tmp_path / "student" / "model.pth", weights_only=True)["model_state_dict"]
    assert all(torch.equal(student[k], v) for k, v in teacher.items() if k.startswith("mask_decoder."))


def test_simulated_clicks_prompt_with_the_mask_alone_at_the_mask_only_steps():
    """At the mask-only steps the prompt encoder gets ``points=None`` and the previous step's logits; at every
    other step one click per sample (issue 19, bug 4): watched on the real prompt encoder."""
    model = build_model("tiny-test", seed=0)
    labels = torch.zeros(2, 1, 128, 128, 128)
    labels[0, :, 50:70, 50:70, 50:70] = 1
    labels[1, :, 30:60, 40:90, 60:80] = 1
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(2, 1, 128, 128, 128))
    received, decoded = [], []
    model.prompt_encoder.register_forward_hook(
        lambda mod, args, kwargs, out: received.append((kwargs["points"], kwargs["masks"].detach().clone())),
        with_kwargs=True)
    model.mask_decoder.register_forward_hook(lambda mod, args, out: decoded.append(out[0].detach().clone()))

    def loss_fn(logits, target):
        return logits.mean()

    simulate_clicks(model, embedding, labels, loss_fn, np.random.default_rng(0), num_clicks=6, mask_only=(2, 5),
                    loss_size=32)
    assert [points is None for points, _ in received] == [False, False, True, False, False, True]
    for step, (points, masks) in enumerate(received):
        if points is not None:
            assert points[0].shape == (2, 1, 3) and points[1].shape == (2, 1)
        previous = decoded[step - 1] if step else torch.zeros(2, 1, 32, 32, 32)
        assert torch.equal(masks, previous), f"step {step} was not fed the previous step's logits"

    received.clear()  # the default: one random step in [2, 9) and the last of the 11
    simulate_clicks(model, embedding[:1], labels[:1], loss_fn, np.random.default_rng(1), loss_size=32)
    mask_only = [step for step, (points, _) in enumerate(received) if points is None]
    assert len(received) == 11 and len(mask_only) == 2 and 2 <= mask_only[0] < 9 and mask_only[1] == 10


@pytest.mark.parametrize("name", ["../outside/private.npy", "/etc/private.npy", "sub/x.npy", "..\\x.npy", ""])
def test_a_crop_cache_whose_index_names_files_outside_its_folder_is_refused(tmp_path, name):
    """A handed cache's ``index.json`` could make training read any ``.npy`` file the user can read."""
    from FastSAM3DLib.errors import DataSourceError

    cache = prepare_crops(tmp_path / "c", [_synthetic_pair(tmp_path)], margin=0, min_voxels=50, log=lambda _: None)
    index = cache.root / "index.json"
    meta = json.loads(index.read_text())
    meta["entries"][0]["image_file"] = name
    index.write_text(json.dumps(meta))
    with pytest.raises(DataSourceError, match="index.json is damaged .* not a file in the cache folder"):
        CropCache(cache.root)


def _as_older_checkpoint(path, *unrecorded):
    """Rewrite the checkpoint at ``path`` as a version that did not record the fingerprint keys ``unrecorded``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in unrecorded:
        del state["args"]["fingerprint"][key]
    torch.save(state, path)


@pytest.mark.filterwarnings("ignore:.*did not record teacher_weights")  # said before each refusal below too
def test_an_older_checkpoint_is_resumed_with_its_own_optimiser_settings_checked_and_unrecorded_ones_said(
        tmp_path, crop_cache):
    """A checkpoint made before the fingerprint recorded the optimiser's settings and the teacher's weights was
    resumed with any --lr or --weight-decay (the saved optimiser silently kept its own, while the new checkpoint
    recorded the new ones) and with a replaced teacher file, without a word."""
    from FastSAM3DLib.errors import FastSAM3DError

    teacher = _teacher_file(tmp_path / "teacher.pth", seed=5)

    def run(**kw):
        config = DistillConfig(teacher="tiny-test-teacher", student="tiny-test", data=str(crop_cache.root),
                               stage_epochs=1, teacher_checkpoint=teacher, lr=kw.pop("lr", 8e-4))
        return distill(config, _loop(tmp_path, "run", **kw), log=lambda _: None)

    run(steps=3, stop_after_steps=1)
    _as_older_checkpoint(tmp_path / "run" / "latest.pth", "optimisation", "teacher_weights")
    for changed in (dict(lr=5e-3), dict(weight_decay=0.0)):
        with pytest.raises(FastSAM3DError, match="optimisation"):
            run(steps=3, resume=True, stop_after_steps=2, **changed)
    with pytest.warns(UserWarning, match="older FastSAM3D that did not record teacher_weights.*another --output"):
        run(steps=3, resume=True, stop_after_steps=2)
    _teacher_file(teacher, seed=6)  # the checkpoint it wrote records everything: the teacher file is checked
    with pytest.raises(FastSAM3DError, match="teacher_weights"):
        run(steps=3, resume=True)
