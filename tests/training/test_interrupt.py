"""SIGINT and SIGTERM during training: the step and any save under way finish, a checkpoint and the
metrics record of that step are written, and the run resumes to the same loss curve.

In-process tests send the signal to this process from inside a step; the command-line tests run
``pixeldit train`` in a subprocess and signal it while a save is under way (the save pauses
there through the test hook ``PIXELDIT_TEST_SAVE_PAUSE``).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import CFG, ToyDataset, tc  # noqa: E402  (the shared tiny run)

from pixeldit import training as T

ROOT = Path(__file__).resolve().parents[2]


class Signalling(ToyDataset):
    """Sends ``signum`` to this process while batch ``at`` is prepared (the step then still runs)."""

    def __init__(self, signum, at, times=1):
        super().__init__()
        self.signum, self.at, self.times = signum, at, times

    def get_batch(self, step, batch_size):
        if step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return super().get_batch(step, batch_size)


def steps_of(workdir) -> list[int]:
    return [r["step"] for r in T.read_metrics(workdir)]


@pytest.mark.parametrize("signum, times", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_signal_finishes_the_step_saves_and_resumes(tmp_path, signum, times):
    config = tc(steps=8, checkpoint_every=100, log_every=3)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    with pytest.raises(T.Interrupted) as info:
        T.train(CFG, config, Signalling(signum, at=3, times=times), tmp_path / "a", progress=False)
    assert info.value.signum == signum and info.value.step == 4  # batch 3 makes step 4
    assert isinstance(info.value, KeyboardInterrupt)
    assert T.latest_checkpoint_step(tmp_path / "a") == 4
    assert steps_of(tmp_path / "a") == [3, 4]  # the interrupt step's record is written
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    resumed = T.train(CFG, config, ToyDataset(), tmp_path / "a", progress=False).summary
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    assert steps_of(tmp_path / "a") == [3, 4, 6]
    whole = T.train(CFG, config, ToyDataset(), tmp_path / "b", progress=False).summary
    records = {r["step"]: r["loss"] for r in T.read_metrics(tmp_path / "a")}
    reference = {r["step"]: r["loss"] for r in T.read_metrics(tmp_path / "b")}
    assert records[6] == reference[6]
    assert resumed["losses"] == whole["losses"][4:]


# ---------------------------------------------------------------------------------------------
# the command, signalled while a checkpoint is being written
# ---------------------------------------------------------------------------------------------

TRAIN = ["train", "digits", "--no-progress", "--set", "data.resolution=8"] + [
    a for k, v in {"model.hidden_size": 16, "model.num_groups": 2, "model.patch_depth": 1, "model.pixel_depth": 1,
                   "model.pixel_hidden_size": 4, "model.patch_size": 4, "train.batch_size": 8, "train.steps": 6,
                   "train.checkpoint_every": 2, "train.log_every": 1, "train.sample_every": 0,
                   "train.warmup_steps": 0, "train.ema_decay": 0.5}.items() for a in ("--set", f"{k}={v}")]


def command(workdir, pause: float | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src"))
    env.pop("PIXELDIT_TEST_SAVE_PAUSE", None)
    if pause:
        env["PIXELDIT_TEST_SAVE_PAUSE"] = str(pause)
    return subprocess.Popen([sys.executable, "-m", "pixeldit", *TRAIN, "--workdir", str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def losses(workdir) -> list[float]:
    steps = steps_of(workdir)
    assert steps == sorted(set(steps)), steps  # strictly increasing
    return [r["loss"] for r in T.read_metrics(workdir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    wd = tmp_path_factory.mktemp("interrupt") / "ref"
    rc, err = finish(command(wd))
    assert rc == 0, err
    assert steps_of(wd) == [1, 2, 3, 4, 5, 6]
    return losses(wd)


@pytest.mark.slow
@pytest.mark.parametrize("signals, rc", [([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)])
def test_command_signalled_during_a_save(tmp_path, reference, signals, rc):
    wd = tmp_path / "wd"
    proc = command(wd, pause=2.0)
    lines = []
    for line in proc.stderr:  # wait until the save of step 2 is under way
        lines.append(line)
        if "pausing in the save of step 2" in line:
            break
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.3)
    code, err = finish(proc)
    err = "".join(lines) + err
    assert code == rc, err
    assert "Traceback" not in err, err
    assert f"interrupted ({signal.Signals(signals[0]).name}): checkpoint at step 2" in err, err
    assert sorted(os.listdir(wd / T.CHECKPOINT_SUBDIR)) == ["2"]  # committed, no temporary directory left
    assert steps_of(wd) == [1, 2]
    code, err = finish(command(wd))
    assert code == 0, err
    assert losses(wd) == reference
