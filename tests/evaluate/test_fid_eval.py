"""ADM-evaluator export (resumable, deterministic per batch) and the FID of samples against data."""

import numpy as np
import pytest
from paper_golden import load
from seeded import seeded_state_dict

from pixeldit.evaluate.fid_eval import adm_export, as_uint8_rgb, batch_seed, fid_against_data
from pixeldit.fid import extract_features, feature_statistics, frechet_distance, load_statistics
from pixeldit.fid.inception import FIDInceptionV3, load_torch_state_dict


def fake_draw(calls):
    def draw(y, y_null, seed):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return rng.uniform(-1, 1, (len(y), 8, 6, 1)).astype(np.float32)

    return draw


def test_adm_export_writes_batches_resumes_and_merges(tmp_path):
    y = np.arange(10) % 4
    calls = []
    res = adm_export(fake_draw(calls), y, y, tmp_path, batch_size=4, seed=3, labels=True)
    assert (res["batches"], res["batches_drawn"], res["batches_skipped"]) == (3, 3, 0)
    assert calls == [batch_seed(3, i) for i in range(3)]
    with np.load(res["adm_npz"]) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 8, 6, 3)  # grayscale repeated to RGB
    np.testing.assert_array_equal(labels, y)
    (tmp_path / "batch_000001.npz").unlink()  # a stopped export: batch 1 missing
    calls.clear()
    res = adm_export(fake_draw(calls), y, y, tmp_path, batch_size=4, seed=3, labels=True)
    assert calls == [batch_seed(3, 1)] and res["batches_skipped"] == 2
    with np.load(res["adm_npz"]) as f:
        np.testing.assert_array_equal(f["arr_0"], images)  # the same images as the uninterrupted export
    with pytest.raises(ValueError, match="holds batches beyond the 2 of this export"):
        adm_export(fake_draw([]), y[:8], y[:8], tmp_path, batch_size=4, seed=3, labels=False)


def test_adm_export_split_over_processes_equals_one_process(tmp_path):
    """Process p draws the batches i with i % 2 == p; process 0 alone joins them after the barrier."""
    y = np.arange(10) % 4
    one = adm_export(fake_draw([]), y, y, tmp_path / "one", batch_size=3, seed=7, labels=True)
    shared = tmp_path / "shared"
    calls1, calls0, barriers = [], [], []
    res1 = adm_export(fake_draw(calls1), y, y, shared, batch_size=3, seed=7, labels=True,
                      process_index=1, process_count=2, barrier=lambda: barriers.append(1))
    assert calls1 == [batch_seed(7, 1), batch_seed(7, 3)] and barriers == [1]
    assert sorted(p.name for p in shared.iterdir()) == ["batch_000001.npz", "batch_000003.npz"]  # no merge
    assert (res1["batches"], res1["batches_drawn"], res1["batches_skipped"]) == (4, 2, 0)
    res0 = adm_export(fake_draw(calls0), y, y, shared, batch_size=3, seed=7, labels=True,
                      process_index=0, process_count=2, barrier=lambda: barriers.append(0))
    assert calls0 == [batch_seed(7, 0), batch_seed(7, 2)] and barriers == [1, 0]
    assert res0["adm_npz"] == res1["adm_npz"] == str(shared / "samples_10.npz")
    with np.load(one["adm_npz"]) as a, np.load(res0["adm_npz"]) as b:
        np.testing.assert_array_equal(b["arr_0"], a["arr_0"])
        np.testing.assert_array_equal(b["arr_1"], y)
    (shared / "batch_000003.npz").unlink()  # process 1 stopped early: only it draws again on resume
    (shared / "samples_10.npz").unlink()
    calls0.clear()
    calls1.clear()
    res1 = adm_export(fake_draw(calls1), y, y, shared, batch_size=3, seed=7, labels=True,
                      process_index=1, process_count=2, barrier=lambda: None)
    assert calls1 == [batch_seed(7, 3)] and res1["batches_skipped"] == 1
    res0 = adm_export(fake_draw(calls0), y, y, shared, batch_size=3, seed=7, labels=True,
                      process_index=0, process_count=2, barrier=lambda: None)
    assert calls0 == [] and res0["batches_skipped"] == 2
    with np.load(one["adm_npz"]) as a, np.load(res0["adm_npz"]) as b:
        np.testing.assert_array_equal(b["arr_0"], a["arr_0"])


def test_adm_export_merge_refuses_missing_batches_of_another_process(tmp_path):
    y = np.arange(6)
    with pytest.raises(ValueError, match="not contiguous from 0"):  # process 1's batch 1 is not there
        adm_export(fake_draw([]), y, y, tmp_path, batch_size=2, seed=0, labels=False,
                   process_index=0, process_count=2, barrier=lambda: None)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
        adm_export(fake_draw([]), y, y, tmp_path, batch_size=2, seed=0, labels=False,
                   process_index=2, process_count=2, barrier=lambda: None)


def test_uint8_rgb_rounds_like_the_reference():
    x = np.array([-1.0, -0.999, 0.0, 1.0, 1.5], np.float32).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(as_uint8_rgb(x)[0, 0, :, 0], [0, 0, 128, 255, 255])  # clip((x+1)*127.5+0.5)
    assert as_uint8_rgb(x).shape == (1, 1, 5, 3)


@pytest.mark.slow
def test_fid_of_identical_sets_is_zero_and_the_stats_are_cached(tmp_path):
    meta, _ = load("inception.npz")
    inception = FIDInceptionV3(resize_input=False)  # 75 px in, no 299 px resize: every block, small maps
    load_torch_state_dict(inception, seeded_state_dict(meta["shapes"], meta["seed"]))
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (6, 75, 75, 1)).astype(np.float32)
    other = rng.uniform(-1, 1, (6, 75, 75, 1)).astype(np.float32)
    cache = tmp_path / "stats.npz"
    kw = dict(stats_cache=cache, fingerprint={"data": "noise"}, batch_size=6)
    same = fid_against_data(real, real, inception, **kw)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and cache.is_file()
    mu, sigma = load_statistics(cache)
    apart = fid_against_data(other, np.zeros_like(real), inception, **kw)  # the cache stands for the real set
    feats = extract_features(inception, [as_uint8_rgb(other).astype(np.float32) / 255.0], batch_size=6)
    assert apart["fid"] == pytest.approx(frechet_distance(*feature_statistics(feats), mu, sigma), rel=1e-6)
    assert apart["fid"] > 1e-3
    with pytest.raises(ValueError, match="was made from"):
        fid_against_data(other, real, inception, **dict(kw, fingerprint={"data": "x"}))
