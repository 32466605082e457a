"""Model configs: validation at construction, dict round trips, presets by name, the re-export from model."""

import subprocess
import sys

import pytest

import pixeldit.model
import pixeldit.model_config
from pixeldit.model_config import C2IConfig, T2IConfig, ThetaConfig, config_from_dict, preset

# one tiny config per model kind (test_model.py builds its models from these)
TINY = {
    "c2i": C2IConfig(in_channels=3, num_groups=2, hidden_size=32, pixel_hidden_size=8, patch_depth=2, pixel_depth=2,
                     patch_size=4, num_classes=5),
    "t2i": T2IConfig(in_channels=3, num_groups=2, hidden_size=32, pixel_hidden_size=8, patch_depth=2, pixel_depth=2,
                     patch_size=4, txt_embed_dim=12, txt_max_length=6, pixel_attn_hidden_size=16, pixel_num_groups=2),
    "theta": ThetaConfig(in_channels=1, num_groups=2, hidden_size=32, pixel_hidden_size=8, patch_depth=2, pixel_depth=2,
                         patch_size=4, theta_dim=3),
}


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="XL/16"):
        preset("XXL/2")


@pytest.mark.parametrize("kind", list(TINY))
def test_config_round_trip(kind):
    cfg = TINY[kind]
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=30, num_groups=4), "divisible"),
        (dict(hidden_size=24, num_groups=4), "multiple of 4"),
        (dict(pixel_depth=0), "pixel_depth"),
        (dict(dtype="int8"), "dtype"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C2IConfig(**kwargs)


def test_t2i_pixel_heads_validated():
    with pytest.raises(ValueError, match="pixel_attn_hidden_size"):
        T2IConfig(pixel_attn_hidden_size=100, pixel_num_groups=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(theta_center=(0.0, 0.0, 0.0)), "both or neither"),
        (dict(theta_center=(0.0,), theta_scale=(1.0,), theta_channels=2), "theta_dim=3 values"),
        (dict(theta_center=(0.0,) * 3, theta_scale=(1.0, 0.0, 1.0), theta_channels=2), "theta_scale must be > 0"),
        (dict(theta_center=(0.0,) * 3, theta_scale=(1.0,) * 3), "theta_channels must be 2"),
    ],
)
def test_theta_encoding_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TINY["theta"].replace(**kwargs)


def test_theta_config_derives_its_token_fields():
    cfg = TINY["theta"]
    assert (cfg.txt_embed_dim, cfg.txt_max_length) == (cfg.theta_channels, cfg.theta_dim)
    assert "txt_embed_dim" not in cfg.to_dict()
    stored = dict(cfg.to_dict(), txt_embed_dim=1, txt_max_length=3)  # as older theta configs were written
    assert config_from_dict(stored) == cfg


@pytest.mark.parametrize("bad", [0, -1, "full", 1.5])
def test_scan_unroll_is_checked(bad):
    with pytest.raises(ValueError, match=r"scan_unroll must be \"auto\", true, false or an integer >= 1, got"):
        TINY["c2i"].replace(scan_unroll=bad)


def test_remat_mode_is_checked():
    with pytest.raises(ValueError, match=r"remat must be one of .*'dots'.* got 'all'"):
        TINY["c2i"].replace(remat="all")


CONFIG_NAMES = ("DTYPES", "REMAT_MODES", "SCAN_UNROLL_AUTO", "PixelDiTConfig", "C2IConfig", "T2IConfig", "ThetaConfig",
                "CONFIG_KINDS", "config_from_dict", "PRESETS", "preset")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_model_reexports_the_config_names(name):
    assert getattr(pixeldit.model, name) is getattr(pixeldit.model_config, name)


def test_configs_load_without_the_models():
    code = ("import sys, pixeldit.model_config; "
            "assert 'pixeldit.model' not in sys.modules, 'pixeldit.model_config imported pixeldit.model'")
    subprocess.run([sys.executable, "-c", code], check=True)
