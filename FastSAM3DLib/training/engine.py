"""The training loop shared by distillation and fine-tuning.

A *task* (:class:`TrainingTask`) owns the models and computes a loss; :func:`run_training` does the rest,
the same way on CPU and CUDA:

* AdamW with per-group learning rates, linear warm-up then cosine decay (or constant), gradient clipping,
  gradient accumulation; AMP (``torch.autocast`` float16 + ``GradScaler``) on CUDA only;
* seeded: the randomness of optimiser step ``s`` (data, augmentation, clicks) comes from
  ``numpy.random.default_rng([seed, s, micro_batch])`` and ``torch.manual_seed(seed + s)``, so a resumed run
  draws exactly what an uninterrupted one would;
* resumable: ``<output>/latest.pth`` (official checkpoint format plus step, AMP scaler and trainer-only
  modules, see :mod:`.checkpoints`) is written atomically every ``checkpoint_every`` steps and at the end;
  ``resume=True`` continues from it; the final weights without optimiser state go to ``<output>/model.pth``;
* observable: a progress bar with the loss and the time left (tqdm when installed) and a JSON log,
  ``<output>/log.jsonl``, one line per step and per epoch (a resumed run drops the lines after its checkpoint and
  takes the losses of its epoch's earlier steps from it; a run without a checkpoint starts the log over).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import SettingError
from ..files import atomic_output, parse_json
from . import checkpoints

SCHEDULES = ("cosine", "constant")


@dataclass
class LoopConfig:
    """Settings of the optimisation loop (model-independent)."""

    output: str
    steps: int = 1000
    steps_per_epoch: int = 100
    batch_size: int = 1
    accumulate: int = 1
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    checkpoint_every: int = 50
    seed: int = 2023
    device: Optional[str] = None
    amp: bool = True  # used on CUDA only
    threads: Optional[int] = None
    resume: bool = False
    quiet: bool = False
    max_seconds: Optional[float] = None  # stop (with a checkpoint) after this much wall-clock time
    stop_after_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps in this invocation


class TrainingTask:
    """What a training run trains: override :meth:`param_groups` and :meth:`loss`.

    ``model``: the module saved as ``model_state_dict`` (a whole Sam3D); ``extra``: trainer-only trainable
    modules saved only in the resumable checkpoint (e.g. distillation projections); ``args``: plain settings
    stored in the checkpoint; ``fingerprint``: the settings a resumed run must share.
    """

    model: torch.nn.Module
    extra: Optional[torch.nn.Module] = None
    args: Dict[str, Any] = {}
    fingerprint: Dict[str, Any] = {}

    def param_groups(self) -> List[Dict[str, Any]]:
        """Optimiser parameter groups, each with ``params`` and ``lr``."""
        raise NotImplementedError

    def loss(self, step: int, epoch: int, rng: np.random.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one micro-batch and numbers to log."""
        raise NotImplementedError

    def status(self, step: int, epoch: int) -> Dict[str, Any]:
        """Extra fields for the log line of ``step`` (e.g. the active distillation pairs)."""
        return {}

    def train_mode(self) -> None:
        """Put the trained modules in training mode (frozen ones stay in eval mode)."""
        self.model.train()
        if self.extra is not None:
            self.extra.train()


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` or CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_factor(step: int, config: LoopConfig) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based): warm-up, then cosine or constant."""
    if config.schedule not in SCHEDULES:
        raise SettingError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The random generator of micro-batch ``micro`` of optimiser step ``step``."""
    return np.random.default_rng([int(seed), int(step), int(micro)])


class JsonLog:
    """Append-only JSON-lines log; :meth:`truncate_after` drops lines of steps a resumed run will redo."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only the lines whose ``step`` is at most ``step`` (lines without a step are kept)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = parse_json(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        with atomic_output(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def clear(self) -> None:
        """Start the log over (a run without a checkpoint redoes every step, so a killed run's lines go)."""
        if self.path.is_file():
            with atomic_output(self.path) as tmp:
                tmp.write_text("", encoding="utf-8")

    def step_losses(self, first: int, last: int) -> Dict[int, float]:
        """The logged ``loss`` of each step ``first..last`` (1-based, inclusive) that has a step line."""
        losses: Dict[int, float] = {}
        if not self.path.is_file():
            return losses
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = parse_json(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "step" and "loss" in record and \
                    first <= int(record.get("step", 0)) <= last:
                losses[int(record["step"])] = float(record["loss"])
        return losses

    def write(self, record: Dict[str, Any]) -> None:
        """Append one record."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


class _Progress:
    """tqdm when available (loss and time left), otherwise a line every ~10 % of the run."""

    def __init__(self, total: int, initial: int, quiet: bool, desc: str) -> None:
        self.total, self.count, self.quiet, self.start = total, initial, quiet, time.time()
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass
        self.first = initial

    def update(self, values: Dict[str, float]) -> None:
        self.count += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
            self.bar.update(1)
            return
        if self.count == self.total or self.count % max(1, self.total // 10) == 0:
            done = self.count - self.first
            left = (time.time() - self.start) / max(done, 1) * (self.total - self.count)
            text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            print(f"step {self.count}/{self.total} {text} ~{left / 60:.1f} min left", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def holding_output(config: LoopConfig):
    """A context holding the run folder ``config.output`` (made when new) for one run: build the task and call
    :func:`run_training` inside it. A second run into the same folder (a ``--resume`` started while the first
    still trains) is refused before it builds or deletes anything, instead of training a second copy that
    interleaves the log and overwrites the checkpoint (or removing the first one's teacher features)."""
    from ..errors import FastSAM3DError
    from ..sole_writer import sole_writer

    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise FastSAM3DError(f"{output} is a file, not a folder: give --output a folder for the run (its "
                             "checkpoint, weights and log).")

    def refusal(holder: str, lock_path: Path) -> Exception:
        return FastSAM3DError(f"Another training run is writing into {output} ({holder}): wait until it has "
                              f"finished (then --resume it if it stopped early), or choose another --output "
                              f"folder (if none is running, delete {lock_path}).")

    return sole_writer(output, ".train.lock", "training into the same folder", refusal)


def run_training(task: TrainingTask, config: LoopConfig, log: Callable[[str], None] = print,
                 desc: str = "training") -> Dict[str, Any]:
    """Train ``task`` as configured (inside :func:`holding_output`); returns a summary (steps done, last loss,
    checkpoint and weights paths)."""
    from ..errors import FastSAM3DError

    output = Path(config.output)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    output.mkdir(parents=True, exist_ok=True)
    latest, weights = output / checkpoints.CHECKPOINT_NAME, output / checkpoints.WEIGHTS_NAME
    device = next(task.model.parameters()).device
    use_amp = bool(config.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    groups = task.param_groups()
    for group in groups:
        group.setdefault("base_lr", group["lr"])
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    # a resumed run restores the optimizer's own settings: asking for others would be ignored, so it is refused
    fingerprint = dict(task.fingerprint, optimisation={
        "lr": [float(g["base_lr"]) for g in groups], "weight_decay": float(config.weight_decay),
        "warmup_steps": int(config.warmup_steps), "schedule": config.schedule,
        "min_lr_ratio": float(config.min_lr_ratio), "grad_clip": float(config.grad_clip)})
    json_log = JsonLog(output / "log.jsonl")
    start_step = 0
    if latest.is_file():
        if not config.resume:
            raise FastSAM3DError(f"{latest} exists: pass --resume to continue that run, or choose another --output.")
        state = checkpoints.load_checkpoint(latest)
        made_by, now = state.get("args", {}).get("command"), task.args.get("command")
        if made_by and now and made_by != now:
            raise FastSAM3DError(f"Cannot resume {latest}: it is a {made_by} run, not a {now} run. Resume it with "
                                 f"'{made_by} --resume', or give this {now} run another --output.")
        _check_fingerprint(_recorded_fingerprint(state, fingerprint, latest), fingerprint, latest)
        before = state.get("args", {}).get("loop", {}).get("steps")
        if before is not None and int(before) != int(config.steps) and config.schedule != "constant":
            log(f"the learning-rate schedule now ends at step {config.steps} (it was planned for {before})")
        task.model.load_state_dict(state["model_state_dict"], strict=True)
        if task.extra is not None and "extra_state_dict" in state:
            task.extra.load_state_dict(state["extra_state_dict"], strict=True)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        if use_amp and "scaler_state_dict" in state:
            scaler.load_state_dict(state["scaler_state_dict"])
        start_step = int(state.get("step", 0))
        if start_step >= config.steps:  # a finished run: its log and weights stay as they are
            log(f"{latest} has done its {start_step} steps: nothing to resume (give --steps more than {start_step} "
                "to train on)")
            checkpoints.export_weights(latest, weights)
            loss = json_log.step_losses(start_step, start_step).get(start_step, float("nan"))
            return {"steps": start_step, "loss": loss, "checkpoint": str(latest), "weights": str(weights),
                    "finished": True}
        json_log.truncate_after(start_step)
        log(f"resuming {latest} at step {start_step}")
        json_log.write({"event": "resume", "step": start_step, "time": time.time()})
    else:
        # no checkpoint: every step is done again, so the lines of a run killed before its first one go too
        json_log.clear()
        if config.resume:
            log(f"nothing to resume in {output} (no {checkpoints.CHECKPOINT_NAME} yet): starting from step 0")
        json_log.write({"event": "start", "step": 0, "time": time.time(), "args": checkpoints.plain(task.args)})
    args = dict(task.args, fingerprint=fingerprint, loop=checkpoints.plain(config))

    task.train_mode()
    progress = _Progress(config.steps, start_step, config.quiet, desc)
    started = time.time()
    epoch_losses = _epoch_losses_so_far(json_log, start_step, config, log)
    last_loss = float("nan")
    try:
        for step in range(start_step, config.steps):
            epoch = step // config.steps_per_epoch
            factor = lr_factor(step, config)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            torch.manual_seed(config.seed + step)
            optimizer.zero_grad(set_to_none=True)
            tic = time.time()
            totals: Dict[str, float] = {}
            for micro in range(config.accumulate):
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss, metrics = task.loss(step, epoch, step_rng(config.seed, step, micro))
                scaler.scale(loss / config.accumulate).backward()
                for key, value in dict(metrics, loss=float(loss.detach())).items():
                    totals[key] = totals.get(key, 0.0) + float(value) / config.accumulate
            if config.grad_clip:
                scaler.unscale_(optimizer)
                totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            last_loss = totals["loss"]
            epoch_losses.append(last_loss)
            json_log.write(dict({"event": "step", "step": step + 1, "epoch": epoch,
                                 "lr": optimizer.param_groups[0]["lr"], "step_s": round(time.time() - tic, 3),
                                 "elapsed_s": round(time.time() - started, 1)}, **totals,
                                **task.status(step, epoch)))
            progress.update({"loss": last_loss})
            done = step + 1
            end_of_epoch = done % config.steps_per_epoch == 0 or done == config.steps
            if end_of_epoch:
                json_log.write({"event": "epoch", "step": done, "epoch": epoch,
                                "loss_mean": float(np.mean(epoch_losses)), "steps": len(epoch_losses)})
                epoch_losses = []
            out_of_time = (config.max_seconds is not None and time.time() - started > config.max_seconds) or \
                (config.stop_after_steps is not None and done - start_step >= config.stop_after_steps)
            if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
                checkpoints.save_checkpoint(latest, task.model, optimizer, epoch, done, args, scaler, task.extra)
            if out_of_time and done < config.steps:
                log(f"stopping at step {done} of {config.steps} (continue with --resume)")
                json_log.write({"event": "stop", "step": done, "time": time.time()})
                return {"steps": done, "loss": last_loss, "checkpoint": str(latest), "finished": False}
    finally:
        progress.close()
    done = max(start_step, config.steps)
    if not latest.is_file():  # nothing to do and nothing saved yet (steps == 0)
        checkpoints.save_checkpoint(latest, task.model, optimizer, 0, 0, args, scaler, task.extra)
    checkpoints.export_weights(latest, weights)
    json_log.write({"event": "end", "step": done, "time": time.time(), "loss": last_loss})
    return {"steps": done, "loss": last_loss, "checkpoint": str(latest), "weights": str(weights), "finished": True}


def _epoch_losses_so_far(json_log: JsonLog, start_step: int, config: LoopConfig,
                         log: Callable[[str], None]) -> List[float]:
    """The losses of the steps of the current epoch done before ``start_step`` (from the log), so that a resumed
    run's epoch record is the uninterrupted run's."""
    if start_step >= config.steps:
        return []
    first = start_step // config.steps_per_epoch * config.steps_per_epoch + 1  # 1-based step numbers
    if first > start_step:
        return []
    found = json_log.step_losses(first, start_step)
    missing = [s for s in range(first, start_step + 1) if s not in found]
    if missing:
        epoch = start_step // config.steps_per_epoch
        log(f"{json_log.path} lacks the losses of {len(missing)} step(s) of epoch {epoch} (from step {missing[0]}): "
            "that epoch's record will cover only the steps it has")
    return [found[s] for s in sorted(found)]


def _recorded_fingerprint(state: Dict[str, Any], current: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """The settings the checkpoint ``state`` was made with. A checkpoint of an older version lacks settings it did
    not record yet: the optimizer's are read from its saved optimizer state (which wins on resume), and the
    others are named in a warning, as the run goes on with them as given now."""
    saved = dict(checkpoints.plain(state.get("args", {}).get("fingerprint", {})))
    if "optimisation" not in saved and "optimisation" in current:
        known = _optimisation_in(state)
        if known:
            saved["optimisation"] = dict(checkpoints.plain(current["optimisation"]), **known)
    unrecorded = [k for k in current if k not in saved]
    if unrecorded:
        warnings.warn(f"{path} was made by an older FastSAM3D that did not record {', '.join(unrecorded)}: the run "
                      "goes on with the settings (and files) given now; if they are not the ones the run started "
                      "with (a teacher file replaced since), start a new run with another --output", stacklevel=3)
    return saved


def _optimisation_in(state: Dict[str, Any]) -> Dict[str, Any]:
    """The learning rates and weight decay of a checkpoint's saved optimizer state (the values a resumed optimizer
    uses), as in the fingerprint's ``optimisation``; empty when its groups did not keep their base rates."""
    groups = (state.get("optimizer_state_dict") or {}).get("param_groups") or []
    if not groups or not all("base_lr" in g and "weight_decay" in g for g in groups):
        return {}
    return {"lr": [float(g["base_lr"]) for g in groups], "weight_decay": float(groups[0]["weight_decay"])}


def _check_fingerprint(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made with different essential settings (a setting the checkpoint's version did
    not record yet is not compared)."""
    current = checkpoints.plain(current)
    different = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved.get(k) != v}
    if different:
        from ..errors import FastSAM3DError

        detail = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in different.items())
        raise FastSAM3DError(f"Cannot resume {path}: it was made with other settings ({detail}). "
                             "Use the original settings or another --output.")
