"""Tests for pixeldit.sampling.validation: one-line errors, raised before any compilation."""

import numpy as np
import pytest

from pixeldit.sampling import api, sample, sample_trajectory


def _never_called(x, t, y):  # pragma: no cover - must not be traced
    raise AssertionError("model must not be called when validation fails")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="rk4"), r"unknown method 'rk4'.*euler, heun, heun_exact, flow_dpm, dpm_solver_2m, adaptive"),
        (dict(num_steps=0), r"num_steps must be >= 1, got 0"),
        (dict(num_steps=2.5), r"num_steps must be an int"),
        (dict(guidance_interval=(-0.1, 0.5)), r"within \[0, 1\]"),
        (dict(guidance_interval=(0.2, 1.5)), r"within \[0, 1\]"),
        (dict(guidance_interval=(0.8, 0.2)), r"lo <= hi"),
        (dict(noise=np.zeros((2, 4, 4))), r"4-D.*got shape \(2, 4, 4\)"),
        (dict(y=np.zeros((3,), np.int32)), r"batch mismatch: noise has batch 2, y has shape \(3,\)"),
        (dict(y_null=np.zeros((3,), np.int32)), r"batch mismatch: noise has batch 2, y_null has shape \(3,\)"),
        (dict(y=np.zeros((2, 5)), y_null=np.zeros((2, 4))), r"y_null shape \(2, 4\) differs from y shape \(2, 5\)"),
        (dict(y_null=None), r"y_null is required"),
        (dict(timeshift=0.0), r"timeshift"),
        (dict(rtol=1e-3), r"only to method='adaptive'"),
        (dict(method="adaptive", foo=1), r"unknown adaptive option"),
    ],
)
def test_validation_errors(kwargs, match):
    args = dict(noise=np.zeros((2, 4, 4, 1), np.float32), y=np.zeros((2,), np.int32),
                y_null=np.zeros((2,), np.int32), method="euler", num_steps=4, guidance=2.0)
    args.update(kwargs)
    noise, y, y_null = args.pop("noise"), args.pop("y"), args.pop("y_null")
    with pytest.raises(ValueError, match=match):
        sample(_never_called, noise, y, y_null, **args)


def test_validation_precedes_compilation(monkeypatch):
    def boom(*a, **k):  # pragma: no cover
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(api, "_run", boom)  # the module where _dispatch looks _run up
    with pytest.raises(ValueError):
        sample_trajectory(_never_called, np.zeros((1, 2, 2, 1)), np.zeros((2,), np.int32),
                          method="euler", num_steps=2)
    # the patch takes effect: valid arguments do reach the compiled function
    with pytest.raises(AssertionError, match="compiled before validating"):
        sample_trajectory(_never_called, np.zeros((1, 2, 2, 1)), np.zeros((1,), np.int32),
                          method="euler", num_steps=2)
