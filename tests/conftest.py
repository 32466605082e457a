"""Test-session setup: tests import the golden-data helper from this folder; JAX caches compiles on disk.

XLA's CPU compiles dominate this suite's time (each tiny program takes ~0.3 s to compile here);
a persistent compilation cache lets the two xdist workers and later runs reuse identical programs.
"""

import os
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_CACHE = Path(os.environ.get("PIXELDIT_TEST_JAX_CACHE", Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def reference_precision():
    """Float32 products in full float32, as the reference computes them, for module-level parity tests.

    A GPU's default float32 matmul runs in TF32 passes (parity errors near 1e-2 on an H200).  Whole
    models choose full precision for float32 themselves (``pixeldit.model.matmul_precision``);
    building blocks used alone follow JAX's default, so their golden tests ask for it here.
    """
    with jax.default_matmul_precision("highest"):
        yield
