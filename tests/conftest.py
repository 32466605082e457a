"""Test-session setup: tests import the golden-data helper from this folder; JAX caches compiles on disk.

XLA's CPU compiles dominate this suite's time (each tiny program takes ~0.3 s to compile here);
a persistent compilation cache lets the two xdist workers and later runs reuse identical programs.
"""

import os
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

_CACHE = Path(os.environ.get("PIXELDIT_TEST_JAX_CACHE", Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
