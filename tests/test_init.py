"""The front door: ``from pixeldit import ...`` for notebooks, loaded lazily."""

import subprocess
import sys

import pixeldit
from pixeldit import model, sampling, training


def test_front_door_names():
    from pixeldit import PixelDiTConfig, TrainConfig, build_model, load_checkpoint, preset, sample, train

    assert isinstance(preset("XL/16"), PixelDiTConfig)
    assert build_model is model.build_model and sample is sampling.sample
    assert (TrainConfig, train, load_checkpoint) == (training.TrainConfig, training.train, training.load_checkpoint)
    assert set(pixeldit.__all__) <= set(dir(pixeldit))


def test_unknown_name_is_an_attribute_error():
    try:
        pixeldit.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_lazy():
    code = "import sys, pixeldit; assert 'jax' not in sys.modules, 'import pixeldit imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)
