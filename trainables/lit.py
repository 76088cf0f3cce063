"""The LightningModule every family trains through.

Lightning owns the loop (precision, gradient clipping, device placement, DDP on multi-worker
trials); the family owns the model, the loss and the metrics. Evaluation on ``val_select``
runs every epoch and its metrics go to the reporter (Tune, so ASHA can act).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from .base import Family, HParams, cosine_with_warmup
from .splits import Splits


class NonFiniteLoss(RuntimeError):
    pass


class LitTrial(pl.LightningModule):
    def __init__(self, family: Family, model: torch.nn.Module, hp: HParams, splits: Splits,
                 total_steps: int, step_offset: int = 0, optimizer_state: dict | None = None):
        super().__init__()
        self.family, self.model, self.hp, self.splits = family, model, hp, splits
        self.total_steps, self.step_offset = total_steps, step_offset
        self._optimizer_state = optimizer_state
        self._outs: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self.timing = {"train_s": 0.0, "eval_s": 0.0}
        self._t_epoch = self._t_eval = 0.0
        self._loss_sum = None
        self._loss_n = 0

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        loss = self.family.loss(self.model, batch, self.hp)
        # accumulate on device; one host sync per epoch, not per step
        d = loss.detach()
        self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
        self._loss_n += 1
        return loss

    # Training-step seconds: from the epoch's start to its validation. Lightning runs validation
    # (and so the report and checkpoint, in on_validation_end) *inside* the training epoch, before
    # on_train_epoch_end: timing the whole epoch would count evaluation, checkpointing and the
    # wait on Tune as training, and the epoch-1 report would still read 0.
    def on_train_epoch_start(self):
        self._loss_sum, self._loss_n = None, 0
        self._t_epoch = time.perf_counter()

    def _stop_train_clock(self):
        if self._t_epoch:
            self.timing["train_s"] += time.perf_counter() - self._t_epoch
            self._t_epoch = 0.0

    def on_train_epoch_end(self):
        self._stop_train_clock()  # an epoch without validation

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        fused = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hp.lr, betas=(0.9, 0.95), fused=fused or None,
        )
        if self._optimizer_state is not None:
            opt.load_state_dict(self._optimizer_state)
            for g in opt.param_groups:  # the schedule below owns the lr
                g["lr"] = self.hp.lr
        sched_fn = cosine_with_warmup(self.total_steps, self.hp.warmup_ratio)
        offset = self.step_offset
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched_fn(s + offset))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self):
        self._stop_train_clock()
        self._outs = []
        self._t_eval = time.perf_counter()

    def validation_step(self, batch, batch_idx):
        self._outs.append({k: v.detach().cpu() for k, v in self.family.eval_batch(self.model, batch).items()})

    def on_validation_epoch_end(self):
        if not self._outs:
            return
        out = {k: torch.cat([o[k] for o in self._outs]) for k in self._outs[0]}
        self._outs = []
        metrics = self.family.metrics(out, self.splits)
        if self._loss_sum is not None and self._loss_n:
            train_loss = float(self._loss_sum) / self._loss_n
            metrics["train_loss"] = train_loss
            if not torch.isfinite(torch.tensor(train_loss)):
                raise NonFiniteLoss(f"training loss became {train_loss} in epoch {self.current_epoch + 1}")
        self.timing["eval_s"] += time.perf_counter() - self._t_eval
        self.last_metrics = metrics
