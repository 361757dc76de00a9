"""The optimiser and learning-rate schedule knobs reach training as configured."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from seq2seq.config import OptimConfig, TrainApp, TrainingConfig, validate
from seq2seq.training.optim import build_optimizer, build_scheduler


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _rates(cfg: OptimConfig, steps: int, max_steps: int = 0) -> list[float]:
    """The learning rate of each of the first ``steps`` optimiser steps."""
    optimiser = build_optimizer(_model(), cfg)  # type: ignore[arg-type]
    scheduler = build_scheduler(optimiser, cfg, max_steps)
    rates = []
    for _ in range(steps):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        assert scheduler is not None
        scheduler.step()
    return rates


def test_warmup_ramps_linearly_then_decays_with_the_inverse_square_root():
    cfg = OptimConfig(lr=0.01, schedule="warmup", warmup_steps=4)  # type: ignore[arg-type]
    rates = _rates(cfg, 16)
    assert rates[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert rates[3:] == pytest.approx([0.01 * math.sqrt(4 / (s + 1)) for s in range(3, 16)])


def test_cosine_ramps_then_falls_to_min_lr_at_the_step_budget_and_stays_there():
    cfg = OptimConfig(lr=0.01, schedule="cosine", warmup_steps=2, min_lr=0.001)  # type: ignore[arg-type]
    rates = _rates(cfg, 14, max_steps=10)
    assert rates[:2] == pytest.approx([0.005, 0.01])
    assert rates[6] == pytest.approx(0.0055)  # halfway between the peak and the floor
    assert all(a > b for a, b in itertools.pairwise(rates[2:11]))
    assert rates[10:] == pytest.approx([0.001] * 4)


def test_cosine_needs_a_step_budget_beyond_the_warmup():
    app = TrainApp(
        run_dir="x",
        optim=OptimConfig(schedule="cosine", warmup_steps=100),  # type: ignore[arg-type]
        train=TrainingConfig(max_time=60.0),
    )
    with pytest.raises(ValueError, match=r"^optim.schedule=cosine .*train.max_steps=0 must exceed"):
        validate(app)
    validate(dataclasses.replace(app, train=TrainingConfig(max_steps=101)))


@pytest.mark.parametrize("steps", [0, -5])
def test_warmup_without_warmup_steps_is_an_error_naming_the_keys(steps):
    with pytest.raises(ValueError, match=r"optim\.warmup_steps >= 1.*optim\.schedule=constant"):
        OptimConfig(schedule="warmup", warmup_steps=steps)  # type: ignore[arg-type]


def test_adam_betas_reach_the_optimiser():
    for name in ("adam", "adamw"):
        cfg = OptimConfig(name=name, beta1=0.8, beta2=0.95)  # type: ignore[arg-type]
        optimiser = build_optimizer(_model(), cfg)  # type: ignore[arg-type]
        assert optimiser.param_groups[0]["betas"] == (0.8, 0.95)


def test_plateau_halves_the_rate_down_to_min_lr_and_no_further():
    cfg = OptimConfig(lr=0.01, plateau_factor=0.5, plateau_patience=0, min_lr=0.002)
    optimiser = build_optimizer(_model(), cfg)  # type: ignore[arg-type]
    scheduler = build_scheduler(optimiser, cfg)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    rates = []
    for _ in range(6):
        scheduler.step(10.0)  # validation BLEU that never improves
        rates.append(optimiser.param_groups[0]["lr"])
    assert rates == pytest.approx([0.01, 0.005, 0.0025, 0.002, 0.002, 0.002])
