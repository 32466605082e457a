"""The README's notebook snippet (section "Python API") runs exactly as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md's Python API section has no ```python block"
    return blocks[0]


def test_snippet_is_short():
    lines = [line for line in python_api_snippet().splitlines() if line.strip()]
    assert len(lines) <= 10, f"the notebook snippet has {len(lines)} lines"


@pytest.mark.slow  # trains 150 steps (about a minute on 2 CPU cores)
def test_readme_snippet_trains_samples_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet writes to runs/notebook
    namespace: dict = {}
    exec(compile(python_api_snippet(), str(README), "exec"), namespace)
    result, x = namespace["result"], np.asarray(namespace["x"])
    assert result.summary["step"] == 150 and result.summary["steps_run"] == 150
    losses = np.asarray(result.summary["losses"])
    assert losses[-20:].mean() < 0.7 * losses[:10].mean()  # it learned something
    assert x.shape == (10, 16, 16, 1) and np.isfinite(x).all()
    assert (tmp_path / "runs" / "notebook" / "samples.png").stat().st_size > 1000
