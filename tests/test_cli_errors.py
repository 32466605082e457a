"""Bad input to the ``pixeldit`` command: one ``error:`` line on stderr, the right exit code, no
traceback, and nothing left half-written on disk.

The command runs in-process through :func:`pixeldit.cli.run` (what ``main`` calls), so usage
errors go through the same one-line path as in a shell.  Most cases fail before a model is built.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pixeldit import cli, runs

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import TINY  # noqa: E402  (the tiny digits run of the command tests)


def run(capsys, *args) -> tuple[int, list[str], str]:
    code = cli.run([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, [ln for ln in err.splitlines() if ln.strip()], out


def one_error(capsys, args, code: int, *words: str) -> str:
    got, err, out = run(capsys, *args)
    assert got == code, (got, err, out)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in out + "".join(err)
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("errors") / "digits"
    assert cli.run(["train", "digits", "--workdir", str(wd), *TINY]) == 0
    return wd


# ---------------------------------------------------------------------------------------------
# train: run configs and workdirs (nothing is built)
# ---------------------------------------------------------------------------------------------

TRAIN_CASES = [
    ("sample.timeshift=-1", ["sample.timeshift", "-1", "> 0"]),
    ("eval.samples_per_class=0", ["eval.samples_per_class", ">= 1"]),
    ("eval.samples_per_class=-2", ["eval.samples_per_class", "-2"]),
    ("eval.batch_size=0", ["eval.batch_size", ">= 1"]),
    ("model.patch_size=0", ["model.patch_size", ">= 1"]),
    ("model.patch_size=1.5", ["model.patch_size", "1.5"]),
    ("data.resolution=0", ["data.resolution", ">= 1"]),
    ("sample.labels=[1.9]", ["sample.labels", "1.9"]),
    ("sample.labels=[true]", ["sample.labels", "True"]),
    ("sample.theta=[[0.5, 2], [1]]", ["sample.theta", "same length"]),
    ("sample.guidance_interval=[0.8, 0.2]", ["sample.guidance_interval"]),
    ("train.lr='fast'", ["lr", "fast"]),
]


@pytest.mark.parametrize("override, words", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_setting(capsys, tmp_path, override, words):
    one_error(capsys, ["train", "digits", "-w", tmp_path / "wd", "--set", override, "--no-progress"], 1, *words)
    assert not (tmp_path / "wd" / "checkpoints").exists() and not (tmp_path / "wd" / "run.json").exists()


@pytest.mark.parametrize("override, words", [("data.size=0", ["data.size", ">= 1"]),
                                             ("data.prior_low=[5, 5]", ["prior"]),
                                             ("data.prior_low=[1]", ["data.prior_low", "two"])])
def test_bad_grf_setting(capsys, tmp_path, override, words):
    one_error(capsys, ["train", "grf", "-w", tmp_path / "wd", "--set", override, "--no-progress"], 1, *words)
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_workdir_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    one_error(capsys, ["train", "digits", "-w", tmp_path / "f"], 1, "--workdir", "is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_unwritable_workdir(capsys, tmp_path, monkeypatch):
    """A read-only workdir (simulated: tests may run as root, who may write anywhere)."""
    def refuse(run, workdir):
        raise PermissionError(13, "Permission denied", str(Path(workdir) / "run.json"))

    monkeypatch.setattr(runs, "save_run_config", refuse)
    one_error(capsys, ["train", "digits", "-w", tmp_path / "ro", *TINY], 1, "Permission denied", "run.json")


def test_usage_errors_are_one_line(capsys, tmp_path):
    one_error(capsys, ["bench", "--batch", "0"], 2, "--batch")
    one_error(capsys, ["train", "--bogus"], 2, "--bogus")
    one_error(capsys, ["nosuch"], 2, "nosuch")


def test_steps_below_the_checkpoint(capsys, trained):
    before = sorted(os.listdir(trained / "checkpoints"))
    one_error(capsys, ["train", "digits", "-w", trained, *TINY, "--set", "train.steps=1"], 1,
              "train.steps=1", "latest checkpoint", "(2)")
    assert sorted(os.listdir(trained / "checkpoints")) == before


def test_second_train_is_refused(capsys, trained):
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; from pixeldit.training import workdir_lock\n"
                             "with workdir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                             str(trained)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(cli.__file__).parents[1])))
    try:
        assert hold.stdout.readline().strip() == "held"
        before = (trained / "run.json").read_text()
        one_error(capsys, ["train", "digits", "-w", trained, *TINY], 1, f"PID {hold.pid}", "in use")
        assert (trained / "run.json").read_text() == before
    finally:
        hold.kill()
        hold.wait()


# ---------------------------------------------------------------------------------------------
# sample / eval / convert
# ---------------------------------------------------------------------------------------------

SAMPLE_CASES = [
    (["--image-size", "15", "15"], ["--image-size", "patch size 4"]),
    (["--theta", "0.5,2;1"], ["--theta", "same number"]),
    (["--theta", "nan,2"], ["--theta", "finite"]),
    (["--theta", "0.5,2"], ["--theta", "c2i"]),
    (["--labels", "1.9"], ["--labels", "1.9"]),
    (["--labels", "true"], ["--labels", "true"]),
    (["--labels", "12"], ["labels", "12"]),
    (["--set", "sample.timeshift=-1"], ["sample.timeshift"]),
    (["--step", "7"], ["step 7"]),
]


@pytest.mark.parametrize("args, words", SAMPLE_CASES, ids=[" ".join(c[0]) for c in SAMPLE_CASES])
def test_bad_sample_option(capsys, trained, tmp_path, args, words):
    one_error(capsys, ["sample", trained, "-o", tmp_path / "out", "--no-progress", *args], 1, *words)
    assert not (tmp_path / "out" / "samples.npz").exists()


@pytest.mark.parametrize("override, words", [("eval.samples_per_class=0", ["eval.samples_per_class"]),
                                             ("eval.batch_size=0", ["eval.batch_size"])])
def test_bad_eval_option(capsys, trained, tmp_path, override, words):
    one_error(capsys, ["eval", trained, "-o", tmp_path / "out", "--set", override, "--no-progress"], 1, *words)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_negative_guidance_warns_in_one_line(capsys, trained, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        code, err, out = run(capsys, "sample", trained, "-o", tmp_path / "out", "--no-progress", "--guidance", "-3",
                             "--num", "6")
    assert code == 0, err
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "guidance -3" in msgs[0], msgs


def test_random_bytes_as_safetensors(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(os.urandom(1000))
    one_error(capsys, ["convert", bad, tmp_path / "out", "--preset", "XL/16"], 1, str(bad))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDIT_DEBUG", "1")
    with pytest.raises(Exception, match="timeshift"):
        cli.run(["train", "digits", "-w", str(tmp_path / "wd"), "--set", "sample.timeshift=-1"])


# ---------------------------------------------------------------------------------------------
# a damaged newest checkpoint: sample, eval and train go on from the previous one
# ---------------------------------------------------------------------------------------------


def damaged_copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    meta = dest / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    return dest


def test_sample_from_a_damaged_run_in_a_shell(trained, tmp_path):
    """The real command: one warning line on stderr, samples from step 1."""
    wd = damaged_copy(trained, tmp_path / "wd")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(cli.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "sample", str(wd), "--no-progress", "--num", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "step 2 is unreadable" in lines[0], lines
    assert "samples from step 1" in proc.stdout


def test_eval_and_train_on_a_damaged_run(capsys, caplog, trained, tmp_path):
    wd = damaged_copy(trained, tmp_path / "wd")
    with caplog.at_level(logging.WARNING):
        code, err, out = run(capsys, "eval", wd, "--no-progress", "--set", "eval.samples_per_class=1")
        assert code == 0, err
        assert json.loads((wd / "eval" / "metrics.json").read_text())["step"] == 1
        code, err, out = run(capsys, "train", "digits", "-w", wd, *TINY, "--set", "train.steps=3")
        assert code == 0, err
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 2 and all("step 2 is unreadable" in m for m in msgs), msgs
    assert (wd / "damaged_checkpoints" / "2").is_dir()
    assert [r["step"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_full_disk_during_a_save(capsys, tmp_path, monkeypatch):
    """ENOSPC while orbax commits step 2: one line; step 1 stays the intact latest checkpoint."""
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def full(self, *args, **kwargs):
        if "/2." in str(self.get()) or str(self.get()).endswith("/2"):
            raise OSError(28, "No space left on device", str(self.get()))
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
    wd = tmp_path / "wd"
    one_error(capsys, ["train", "digits", "-w", wd, *TINY], 1, "No space left on device")
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(wd / "checkpoints") if "tmp" not in n) == ["1"]
    assert cli.run(["train", "digits", "-w", str(wd), *TINY]) == 0  # resumes from step 1
    assert [r["step"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_condition_options_of_a_theta_model(caplog):
    from pixeldit.model import ThetaConfig
    from pixeldit.runconfig import ConfigError, SampleSection

    cfg = ThetaConfig().with_encoding([0.0, -1.0], [1.0, 1.0])
    with caplog.at_level(logging.WARNING):
        runs.check_condition_options(cfg, SampleSection(theta=((0.5, 0.0), (1.0, -1.0))))
        assert not caplog.records  # on the box's edge: fine
        runs.check_condition_options(cfg, SampleSection(theta=((0.5, 0.0), (3.0, 0.0))))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "[3.0, 0.0]" in msg and "outside the training box" in msg
    with pytest.raises(ConfigError, match="--labels"):
        runs.check_condition_options(cfg, SampleSection(labels=(1,)))


def test_text_file_named_npz(capsys, tmp_path):
    bad = tmp_path / "data.npz"
    bad.write_text("not an archive\n")
    msg = one_error(capsys, ["train", "digits", "--data", bad, "-w", tmp_path / "wd"], 1, str(bad), "not an .npz archive")
    assert "pickle" not in msg
