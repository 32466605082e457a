"""Recovering from a divergence: a resumed run may change its optimiser settings (recorded in
run.json's history); architecture, data and other training settings stay refused."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import CFG, ToyDataset, tc  # noqa: E402  (the shared tiny run)

from pixeldit import cli
from pixeldit import training as T

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_cli import TINY  # noqa: E402


def test_optimiser_settings_may_change_on_resume(tmp_path):
    T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False)
    changed = tc(steps=4, lr=1e-3, warmup_steps=3, grad_clip=0.5, ema_decay=0.5)
    summary = T.train(CFG, changed, ToyDataset(), tmp_path, progress=False).summary
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert T.read_checkpoint_meta(tmp_path)["train_config"]["lr"] == 1e-3


@pytest.mark.parametrize("change, field", [({"grad_clip": None}, "train.grad_clip"), ({"p_uncond": 0.3}, "train.p_uncond"),
                                           ({"batch_size": 8}, "train.batch_size")])
def test_other_changes_stay_refused(tmp_path, change, field):
    T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False)
    with pytest.raises(T.IncompatibleCheckpointError) as info:
        T.train(CFG, tc(steps=4, **change), ToyDataset(), tmp_path, progress=False)
    assert any(d.startswith(field) for d in info.value.differences), info.value.differences


def test_command_records_the_changes_in_run_json(tmp_path):
    wd = tmp_path / "wd"
    assert cli.run(["train", "digits", "-w", str(wd), *TINY]) == 0
    assert "history" not in json.loads((wd / "run.json").read_text())
    assert cli.run(["train", "digits", "-w", str(wd), *TINY, "--set", "train.lr=1e-5", "--set", "train.steps=3"]) == 0
    (entry,) = json.loads((wd / "run.json").read_text())["history"]
    assert entry["resumed_at_step"] == 2
    assert entry["changed"]["lr"][1] == 1e-5 and entry["changed"]["steps"] == [2, 3]
    # run.json with its history still reads as a run config (a resume without a config argument)
    assert cli.run(["train", "-w", str(wd), "--no-progress", "--set", "train.steps=4"]) == 0
    assert len(json.loads((wd / "run.json").read_text())["history"]) == 2
