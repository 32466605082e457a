"""metrics.jsonl stays a true record: strictly increasing steps after every way a run can stop."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import CFG, ToyDataset, tc  # noqa: E402  (the shared tiny run)

from pixeldit import training as T
from pixeldit.training.metrics import METRICS_FILE, truncate_metrics


def steps(workdir) -> list[int]:
    lines = (Path(workdir) / METRICS_FILE).read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]  # every line whole JSON


def test_killed_before_the_first_checkpoint_starts_a_new_file(tmp_path):
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False)
    assert steps(tmp_path) == [1, 2]
    (old,) = tmp_path.glob("metrics-*.jsonl")
    assert [json.loads(line)["step"] for line in old.read_text().splitlines()] == [1, 2, 3]


def test_resume_cuts_records_after_the_checkpoint_and_torn_lines(tmp_path):
    T.train(CFG, tc(steps=4, checkpoint_every=2), ToyDataset(), tmp_path, progress=False)
    with open(tmp_path / METRICS_FILE, "a") as f:  # a SIGKILL after step 6's record, mid-way through step 7's
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
        f.write('{"step": 7, "lo')
    T.train(CFG, tc(steps=6, checkpoint_every=2), ToyDataset(), tmp_path, progress=False)
    assert steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_truncate_removes_a_torn_line_in_the_middle(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n{"step": 4}\n')
    truncate_metrics(tmp_path, 3)
    assert steps(tmp_path) == [1, 3]
