"""DiffMask checkpoints: the format tag, reading with checks, and ``Checkpointed``, the state a DiffMask
saves, loads and resumes from (written with _util.io.atomic_torch_save; which model and data they belong
to: _util.fingerprint)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._util.io import atomic_torch_save
from .._util.progress import progress_bar
from ..images import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from .strategies import Strategy

CHECKPOINT_FORMAT = "masked_ops.diffmask/1"


def load_checkpoint(path: str) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} cannot be read as a DiffMask checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a DiffMask checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


class Checkpointed:
    """The checkpoint side of DiffMask: its state as a dict, saving it atomically, loading it with checks
    (the model's fingerprint, the configuration, the training data), and the line an interrupted fit ends
    with. Uses the DiffMask's attributes: config, model_fingerprint, gate, optimizer, lagrange (and its
    parameter and optimizer), step, generator, history and the running means."""

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": dict(self.config), "model": self.model_fingerprint,
                "gate": self.gate.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lagrange": float(self._lagrange_param.detach()),
                "lagrange_optimizer": self.lagrange_optimizer.state_dict(), "step": self.step,
                "generator": self.generator.get_state(), "history": list(self.history),
                "running": {k: list(v) for k, v in self._running.items()}}

    def load_state_dict(self, state: dict, *, source: str = "state_dict") -> None:
        """Load a state (``state_dict()`` or a checkpoint file's content) made for this model and config."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source} is not a DiffMask state (format {CHECKPOINT_FORMAT})")
        if state["model"] != self.model_fingerprint:
            raise ValueError(f"{source} was made for another model (its weights' fingerprint is {state['model']}, "
                             f"this model's is {self.model_fingerprint})")
        diff = sorted(k for k in set(state["config"]) | set(self.config)
                      if state["config"].get(k) != self.config.get(k))
        if diff:
            saved = state["config"]
            what = ", ".join(f"{k}={saved.get(k)!r} vs {self.config.get(k)!r}" for k in diff)
            raise ValueError(f"{source} was made with another DiffMask configuration (differs in: {what})")
        self.gate.load_state_dict(state["gate"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self._lagrange_param.fill_(float(state["lagrange"]))
        self.lagrange = self._lagrange_param.detach().clone()
        self.lagrange_optimizer.load_state_dict(state["lagrange_optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self._running = {k: list(v) for k, v in state.get("running", {"kl": [], "kept": []}).items()}

    def _resume(self, ckpt: dict, path, data_fp: str, augment: bool) -> None:
        if ckpt.get("data") not in (None, data_fp) or ckpt.get("augment", augment) != augment:
            raise ValueError(f"checkpoint {os.fspath(path)!r} was made by a fit on other training data or "
                             f"augmentation; use another checkpoint path to start a new fit")
        self.load_state_dict(ckpt, source=f"checkpoint {os.fspath(path)!r}")

    def save(self, path: str, **extra) -> None:
        """Write the state to ``path`` atomically (a temporary file, then a rename)."""
        state = self.state_dict()
        state.update({("data" if k == "data_fingerprint" else k): v for k, v in extra.items()})
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str, model: nn.Module, *, strategy: Union[str, "Strategy", None] = None,
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> "Checkpointed":
        """A DiffMask rebuilt from a checkpoint file for ``model`` (refused if made for another model).

        ``strategy`` defaults to the checkpoint's; the explanations do not depend on it (only the
        training did), so any soft strategy may be given for ``evaluate``.
        """
        ckpt = load_checkpoint(path)
        cfg = dict(ckpt["config"])
        name = cfg.pop("strategy")
        if strategy is None:
            strategy = name
        dm = cls(model, strategy=strategy, mean=mean, std=std, **cfg)
        dm.config["strategy"] = name
        dm.load_state_dict(ckpt, source=f"checkpoint {os.fspath(path)!r}")
        return dm

    def _image_batch(self, images, name: str, size_is: str) -> torch.Tensor:
        """``images`` as an N x 3 x S x S float tensor (S = self.image_size; a 3 x S x S image becomes a
        batch of one), else a ValueError/TypeError naming ``name``; ``size_is`` says where S comes from."""
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = images[None]
        s = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must be an N x 3 x {s} x {s} tensor in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.shape[0] == 0:
            raise ValueError(f"{name} is empty (no images)")
        if not images.is_floating_point():
            raise TypeError(f"{name} must be floating point in [0, 1], got {images.dtype}")
        if tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"{name} must be {s} x {s} ({size_is}), got {tuple(images.shape[-2:])}")
        return images

    def _fit_loop(self, data, *, epochs: int, val_images, augment: bool, checkpoint, checkpoint_every: int,
                  val_every: int, progress: Optional[bool], callback: Optional[Callable[[dict], None]], device,
                  desc: str, frozen) -> List[dict]:
        """The training loop of every DiffMask (CNN and ViT): batches, resume, the progress bar, the
        per-epoch history with validation, atomic checkpoints, Ctrl-C with a resume hint.

        The subclass gives ``_train_step(x) -> record`` (floats "kl", "kept", "lagrange"; "layer" is
        shown too when present), ``_history_lagrange()``, ``_check_images`` and ``evaluate``;
        ``frozen``: the context manager that keeps the explained model's weights fixed."""
        from .diffmask_data import data_fingerprint, training_batches
        from .perturb import check_positive

        check_positive(epochs, "epochs")
        check_positive(checkpoint_every, "checkpoint_every")
        check_positive(val_every, "val_every")
        steps_per_epoch, get_batch = training_batches(
            data, batch_size=self.config["batch_size"], augment=augment, image_size=self.image_size,
            seed=self.config["seed"], generator=self.generator, device=device,
            check=lambda b: self._check_images(b, "data batch"))
        if val_images is not None:
            val_images = self._check_images(val_images, "val_images")
        data_fp = data_fingerprint(data)
        if checkpoint is not None:
            folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
            if not os.path.isdir(folder):
                raise ValueError(f"checkpoint: the folder {folder!r} does not exist")
            if os.path.exists(checkpoint):
                self._resume(load_checkpoint(checkpoint), checkpoint, data_fp, augment)
        total = epochs * steps_per_epoch
        bar = progress_bar(total, desc, "step", initial=min(self.step, total),
                           enabled=True if progress is None else progress)
        running = self._running
        frozen.__enter__()
        try:
            while self.step < total:
                epoch, index = divmod(self.step, steps_per_epoch)
                record = self._train_step(get_batch(epoch, index))
                running["kl"].append(record["kl"])
                running["kept"].append(record["kept"])
                self.step += 1
                bar.update(1)
                shown = dict(kl=f"{record['kl']:.3f}", kept=f"{record['kept']:.2f}")
                if "layer" in record:
                    shown["layer"] = record["layer"]
                bar.set_postfix(**shown, lam=f"{record['lagrange']:.2f}")
                if self.step % steps_per_epoch == 0:
                    entry = {"epoch": epoch + 1, "step": self.step, "train_kl": sum(running["kl"]) / len(running["kl"]),
                             "train_kept": sum(running["kept"]) / len(running["kept"]),
                             "lagrange": self._history_lagrange()}
                    if val_images is not None and ((epoch + 1) % val_every == 0 or self.step == total):
                        v = self.evaluate(val_images)
                        entry.update(val_kl=v["kl"], val_kept=v["kept"])
                    self.history.append(entry)
                    running["kl"].clear()
                    running["kept"].clear()
                if checkpoint is not None and (self.step % checkpoint_every == 0 or self.step == total):
                    self.save(checkpoint, data_fingerprint=data_fp, augment=augment)
                if callback is not None:
                    callback(dict(record, step=self.step))
        except KeyboardInterrupt:
            bar.close()
            raise KeyboardInterrupt(self._interrupted_message(checkpoint, total, checkpoint_every)) from None
        finally:
            bar.close()
            frozen.__exit__(None, None, None)
        return self.history

    def _interrupted_message(self, checkpoint, total: int, every: int) -> str:
        """One line for Ctrl-C in ``fit``: where the fit stopped and what resumes it."""
        where = f"DiffMask.fit interrupted at step {self.step} of {total}"
        if checkpoint is None:
            return f"{where}; no checkpoint was written (fit(..., checkpoint=FILE) makes a fit resumable)"
        if not os.path.exists(checkpoint):
            return f"{where}; the checkpoint {checkpoint} was not written yet (the first comes at step {every})"
        saved = load_checkpoint(checkpoint).get("step", "?")
        return (f"{where}; the checkpoint {os.path.abspath(checkpoint)} holds step {saved}: calling fit with "
                f"checkpoint={checkpoint!r} again resumes from it")
