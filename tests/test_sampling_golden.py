"""Parity with the reference PyTorch samplers (Euler, Heun, FlowDPMSolver) on c2i_small weights.

The golden data (tests/golden/samplers.npz) was produced by the reference
``c2i/src/diffusion.py`` samplers in float32 on the CPU.  This test FAILS if the file is
missing: the parity check must not be silently skipped.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pixeldit.sampling import sample, timesteps

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL = 1e-4


def _load(name):
    path = GOLDEN / name
    if not path.is_file():
        pytest.fail(f"golden file missing: {path} (expected the .npz files committed in {GOLDEN})")
    return np.load(path)


@pytest.fixture(scope="module")
def golden():
    data = _load("samplers.npz")
    config = json.loads(str(data["config"]))
    ref_kwargs = json.loads(str(_load("c2i_small.npz")["config"]))["reference_kwargs"]
    state_dict = {k[len("sd/"):]: data[k] for k in data.files if k.startswith("sd/")}
    from pixeldit.convert import from_reference

    model = from_reference("c2i", ref_kwargs, state_dict)
    return data, config, model


def _settings():
    data = _load("samplers.npz")
    return sorted(json.loads(str(data["config"]))["settings"])


def test_golden_has_the_three_samplers():
    methods = {json.loads(str(_load("samplers.npz")["config"]))["settings"][s]["sampler"]
               for s in _settings()}
    assert methods == {"euler", "heun", "flow_dpm"}


@pytest.mark.parametrize("setting", _settings())
def test_time_grid_bit_exact(setting):
    data = _load("samplers.npz")
    cfg = json.loads(str(data["config"]))["settings"][setting]
    ref = data[f"out/{setting}/timesteps"]
    ours = timesteps(cfg["num_steps"], cfg.get("timeshift", 1.0))
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("setting", _settings())
def test_sampler_matches_reference(golden, setting):
    data, config, model = golden
    cfg = config["settings"][setting]
    noise = np.transpose(data["in/noise"], (0, 2, 3, 1))  # NCHW -> NHWC
    y = data["in/y"].astype(np.int32)
    y_null = data["in/uncondition"].astype(np.int32)
    out = sample(
        model, noise, y, y_null,
        method=cfg["sampler"],
        num_steps=cfg["num_steps"],
        guidance=cfg.get("guidance", 1.0),
        timeshift=cfg.get("timeshift", 1.0),
        guidance_interval=(cfg.get("guidance_interval_min", 0.0),
                           cfg.get("guidance_interval_max", 1.0)),
    )
    out = np.transpose(np.asarray(out), (0, 3, 1, 2))  # NHWC -> NCHW
    ref = data[f"out/{setting}"]
    assert out.shape == ref.shape
    err = float(np.max(np.abs(out - ref)))
    print(f"{setting}: max abs error {err:.3e} (output scale {np.max(np.abs(ref)):.3f})")
    assert err <= TOL, f"{setting}: max abs error {err:.3e} > {TOL}"
