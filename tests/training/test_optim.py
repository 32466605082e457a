"""Tests for pixeldit.training.optim: the learning-rate schedule, alone and inside the compiled step."""

import dataclasses
import math

import numpy as np
import pytest

from pixeldit import training as T
from pixeldit.training.config import numerics_key
from pixeldit.model import C2IConfig

CFG = C2IConfig(
    in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=1, pixel_depth=1, pixel_hidden_size=8, num_classes=4
)


def cosine_tail(i, *, lr, warmup, steps, decay):
    """The documented schedule, written out independently of the code under test."""
    f = min(1.0, (i + 1) / warmup) if warmup else 1.0
    decay = min(decay, steps)  # a decay longer than the run covers all of it
    start = steps - decay
    u = min(max((i - start) / decay, 0.0), 1.0) if decay else 0.0
    return lr * f * 0.5 * (1.0 + math.cos(math.pi * u))


@pytest.mark.parametrize("warmup,steps,decay", [(0, 10, 4), (3, 12, 6), (2, 8, 8), (0, 5, 1000)])
def test_lr_schedule_cosine_tail_matches_formula(warmup, steps, decay):
    s = T.lr_schedule(T.TrainConfig(lr=0.3, warmup_steps=warmup, steps=steps, decay_steps=decay))
    got = [float(s(i)) for i in range(steps + 2)]
    want = [cosine_tail(i, lr=0.3, warmup=warmup, steps=steps, decay=decay) for i in range(steps + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # float32 schedule
    assert got[steps] == pytest.approx(0.0, abs=1e-9)  # reaches 0 at `steps`
    n = min(decay, steps)
    assert got[steps - n] == pytest.approx(0.3 * min(1.0, (steps - n + 1) / warmup) if warmup else 0.3)


def test_decay_steps_validated():  # any int >= 0; longer than `steps` decays over all of them
    with pytest.raises(ValueError, match="decay_steps must be an int >= 0"):
        T.TrainConfig(decay_steps=-1)


def test_numerics_key_keeps_steps_only_with_a_decay():
    assert numerics_key(T.TrainConfig(steps=7)).steps == T.TrainConfig().steps
    assert numerics_key(T.TrainConfig(steps=7, decay_steps=3)).steps == 7


class Toy:
    def get_batch(self, step, batch_size):
        rng = np.random.default_rng(step)
        return {"x": rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32),
                "y": rng.integers(0, 4, size=batch_size).astype(np.int32)}

    def metadata(self):
        return {"name": "toy"}


def test_train_applies_the_decay_in_the_compiled_step(tmp_path):
    # The compiled step is cached under a key that drops resume-free fields such as `steps`; the
    # decay is defined relative to `steps`, so the logged lr of real training must follow it.
    tc = T.TrainConfig(batch_size=4, steps=6, lr=0.01, warmup_steps=2, decay_steps=4, log_every=1,
                       checkpoint_every=6, ema_decay=0.5)
    T.train(CFG, tc, Toy(), tmp_path / "run", progress=False)
    logged = [r["lr"] for r in T.read_metrics(tmp_path / "run") if "lr" in r]
    want = [cosine_tail(i, lr=0.01, warmup=2, steps=6, decay=4) for i in range(6)]
    np.testing.assert_allclose(logged, want, rtol=1e-5)
    assert logged[-1] < 0.2 * 0.01  # the tail is active (a constant lr would log 0.01)
