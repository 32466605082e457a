"""The workdir lock: one training process per run directory; a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import CFG, ToyDataset, tc  # noqa: E402  (the shared tiny run)

from pixeldit import training as T
from pixeldit.training.lock import OWNER_FILE

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from pixeldit.training import workdir_lock\nwith workdir_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"


def holder(workdir: Path, seconds: float) -> subprocess.Popen:
    """A process that holds the lock of ``workdir`` for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu"))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_train_is_refused_naming_the_holder(tmp_path):
    proc = holder(tmp_path, 60)
    try:
        with pytest.raises(T.WorkdirLockedError) as info:
            T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False)
        msg = str(info.value)
        assert f"PID {proc.pid}" in msg and socket.gethostname() in msg and "\n" not in msg, msg
        assert not (tmp_path / T.CHECKPOINT_SUBDIR).exists() and not (tmp_path / T.METRICS_FILE).exists()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = holder(tmp_path, 60)
    proc.kill()  # SIGKILL: no clean-up; the owner file stays behind
    proc.wait()
    assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == proc.pid
    summary = T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False).summary
    assert summary["step"] == 2
    assert not (tmp_path / OWNER_FILE).exists()


@pytest.mark.slow
def test_concurrent_runs_first_finishes_with_intact_metrics(tmp_path):
    """A second run started while the first trains is refused; the first run's record is whole."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from test_loop import CFG, ToyDataset, tc\nfrom pixeldit import training as T\n"
        "T.train(CFG, tc(steps=40, checkpoint_every=10), ToyDataset(), sys.argv[1], progress=False)\n"
    )
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu"),
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / OWNER_FILE).exists():
        assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() else "timeout"
        time.sleep(0.05)
    with pytest.raises(T.WorkdirLockedError, match=f"PID {first.pid}"):
        T.train(CFG, tc(steps=40, checkpoint_every=10), ToyDataset(), tmp_path, progress=False)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert [r["step"] for r in T.read_metrics(tmp_path)] == list(range(1, 41))
    assert T.latest_checkpoint_step(tmp_path) == 40
    assert not (tmp_path / OWNER_FILE).exists()
