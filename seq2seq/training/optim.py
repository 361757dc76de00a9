"""The optimiser and learning-rate schedule, built from ``optim.*`` and changed on resume."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from seq2seq.config import OptimConfig

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over all parameters, fused where this torch supports it.

    Why fused: the default CPU implementation loops over parameters with about
    ten elementwise passes each; the fused kernel makes one. Torch before 2.4 has
    no fused CPU kernel and refuses; the multi-tensor version is used then.
    """
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    betas = (cfg.beta1, cfg.beta2)
    try:
        return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, foreach=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int = 0
) -> Scheduler | None:
    """``plateau`` halves the rate when validation BLEU stalls; ``warmup`` ramps
    linearly for ``warmup_steps`` then decays with the inverse square root;
    ``cosine`` ramps the same way then follows a half cosine down to ``min_lr`` at
    ``max_steps``, so a run with a step budget ends on small steps whatever the
    noise in validation (which the plateau rule reacts to late or early)."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            min_lr=cfg.min_lr,
        )
    if cfg.schedule == "warmup" and cfg.warmup_steps > 0:
        warm = cfg.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warm, math.sqrt(warm / (step + 1)))
        )
    if cfg.schedule == "cosine" and max_steps > cfg.warmup_steps:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, _cosine(cfg.warmup_steps, max_steps, cfg.min_lr / cfg.lr if cfg.lr else 0.0)
        )
    return None


def _cosine(warm: int, total: int, floor: float) -> Callable[[int], float]:
    """The rate's factor at each step: linear warm-up, then a half cosine from 1 to
    ``floor`` at ``total``. ``total`` is the step budget read when the trainer is
    built, so a budget changed on resume reshapes the rest of the curve from the
    step reached."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / (total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def apply_optim_changes(
    param_groups: Iterable[dict[str, Any]], scheduler: Any, old: OptimConfig, new: OptimConfig
) -> None:
    """Make changed optimiser settings take effect after the optimiser and scheduler
    states (which carry the old values) were loaded.

    The rate is scaled by ``new.lr / old.lr`` so a schedule's progress (warm-up,
    plateau halvings) carries over to the new base rate.
    """
    scale = new.lr / old.lr if old.lr else 1.0
    groups = list(param_groups)
    for group in groups:
        if scale != 1.0:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] = new.lr
        group["betas"] = (new.beta1, new.beta2)
        group["weight_decay"] = new.weight_decay
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [new.lr] * len(groups)
    if hasattr(scheduler, "min_lrs"):  # ReduceLROnPlateau
        scheduler.factor = new.plateau_factor
        scheduler.patience = new.plateau_patience
        scheduler.min_lrs = [new.min_lr] * len(groups)
