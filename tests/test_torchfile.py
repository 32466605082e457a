import numpy as np
import pytest
from safetensors.numpy import save_file

from pixeldit.torchfile import check_consumed, read_state_dict, take


def test_reads_safetensors(tmp_path):
    save_file({"a": np.ones((2, 3), np.float32), "n": np.arange(3, dtype=np.int64)}, tmp_path / "w.safetensors")
    sd = read_state_dict(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(sd["a"], np.ones((2, 3)))
    assert sd["n"].dtype == np.int64


def test_reads_pickled_torch_files_and_unwraps_checkpoints(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'pixeldit[torch]')")
    torch.save({"state_dict": {"w": torch.ones(2, dtype=torch.bfloat16)}, "epoch": 1}, tmp_path / "m.pth")
    sd = read_state_dict(tmp_path / "m.pth")
    assert list(sd) == ["w"] and sd["w"].dtype == np.float32


def test_bad_files_and_keys_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must be \.safetensors"):
        read_state_dict(tmp_path / "w.txt")
    sd = {"a": np.zeros((2, 3))}
    with pytest.raises(ValueError, match=r"expected shape \(3, 2\)"):
        take(dict(sd), "a", (3, 2))
    with pytest.raises(ValueError, match="unexpected weights in the file, e.g. a"):
        check_consumed(sd, "test")
