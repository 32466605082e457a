import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import assert_close, nchw_to_nhwc
from paper_golden import load
from safetensors.numpy import save_file
from seeded import seeded_array, seeded_state_dict

from pixeldit.fid import extract_features
from pixeldit.fid.inception import FIDInceptionV3, avg_pool_exclude_pad, load_fid_inception, load_torch_state_dict


def _features(model, spec):
    images = nchw_to_nhwc(seeded_array(tuple(spec["shape_nchw"]), spec["seed"]))
    with jax.default_matmul_precision("highest"):
        return extract_features(model, [images], batch_size=len(images))


def _weights(meta):
    return seeded_state_dict(meta["shapes"], meta["seed"])


def test_matches_pytorch_fid_at_the_smallest_input():
    """75 x 75 without resizing (pytorch-fid ``resize_input=False``): every block, small maps."""
    meta, g = load("inception.npz")
    model = FIDInceptionV3(resize_input=False)
    load_torch_state_dict(model, _weights(meta))
    assert_close(_features(model, meta["small"]), g["small_features"])


@pytest.mark.slow
def test_matches_pytorch_fid_with_its_299_resize(tmp_path):
    """pytorch-fid's default path: bilinear resize to 299 x 299, the weights read from a file."""
    meta, g = load("inception.npz")
    weights = _weights(meta)
    weights["fc.weight"] = np.zeros((1008, 2048), np.float32)  # the FID file's classifier, unused
    save_file(weights, tmp_path / "pt_inception.safetensors")
    model = load_fid_inception(tmp_path / "pt_inception.safetensors")
    assert_close(_features(model, meta["resized"]), g["resized_features"])


def test_loading_is_strict():
    meta, _ = load("inception.npz")
    weights = _weights(meta)
    weights.pop("Mixed_7c.branch_pool.bn.running_var")
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.bn.running_var"):
        load_torch_state_dict(FIDInceptionV3(), weights)
    with pytest.raises(ValueError, match="unexpected weights"):
        load_torch_state_dict(FIDInceptionV3(), {**_weights(meta), "AuxLogits.fc.weight": np.zeros((2, 2))})


def test_average_pool_excludes_padding():
    x = jnp.ones((1, 4, 5, 2))
    np.testing.assert_array_equal(avg_pool_exclude_pad(x), x)  # a constant map stays constant at the borders


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        FIDInceptionV3()(jnp.zeros((1, 3, 32, 32)))
