"""Host runtime settings that make XLA's CPU backend faster, applied by the ``pixeldit`` command.

Two settings, both measured on the ``s8-64`` benchmark (see ``docs/benchmark-log.md``):

* **XLA flags** (CPU-only machines): ``--xla_cpu_use_fusion_emitters=false`` and
  ``--xla_backend_optimization_level=1``.  They cut the train step's first-call compile from
  ~18 s to ~10 s on a 2-core CPU with no measurable change in step time: the matrix multiplies
  run in YNNPACK either way, and LLVM's heavier optimisation of the elementwise kernels did not
  pay for itself.  Flags the user already set in ``XLA_FLAGS`` are left alone.
* **Transparent huge pages for malloc** (Linux, glibc >= 2.35): ``GLIBC_TUNABLES=
  glibc.malloc.hugetlb=1``.  XLA allocates each executable's temporary buffer (1.2 GB for the
  ``s8-64`` train step) afresh on every call; with 4 KiB pages that is ~300 000 page faults
  (about 1 s of kernel time) per step; with huge pages, ~700.  glibc reads this variable only
  at process start, so :func:`configure_host` re-executes the command once with it set.

Set ``PIXELDIT_HOST_TUNING=0`` to turn both off.  Library users can export the same variables
themselves (``XLA_FLAGS`` before JAX initialises its backend, ``GLIBC_TUNABLES`` before Python
starts)::

    export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
    export XLA_FLAGS="--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"

The command also keeps JAX's persistent compilation cache (:func:`configure_compilation_cache`):
a second ``pixeldit train`` (resuming), ``sample`` or ``eval`` of the same model loads its
compiled programs from disk instead of compiling them again.  ``pixeldit bench`` always
compiles cold.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import MutableMapping, Sequence

__all__ = [
    "ATTENTION_ENV",
    "CPU_XLA_FLAGS",
    "HUGEPAGE_TUNABLE",
    "compilation_cache_dir",
    "configure_compilation_cache",
    "configure_host",
    "cpu_only",
    "merge_xla_flags",
    "settings",
]

CPU_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=1",
)
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_OPT_OUT = "PIXELDIT_HOST_TUNING"
ATTENTION_ENV = "PIXELDIT_ATTENTION"  # auto | xla | cudnn (pixeldit.attention)
_CACHE_ENV = "PIXELDIT_COMPILATION_CACHE"  # "0" turns the cache off; a path puts it there
CACHE_MAX_BYTES = 2 * 2**30  # least recently used programs are evicted beyond this
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def merge_xla_flags(existing: str, defaults: Sequence[str]) -> str:
    """``existing`` XLA flags plus each of ``defaults`` whose flag name ``existing`` does not set."""
    names = {tok.split("=", 1)[0] for tok in existing.split()}
    extra = [flag for flag in defaults if flag.split("=", 1)[0] not in names]
    return " ".join([existing.strip(), *extra]).strip()


def cpu_only(env: MutableMapping[str, str] = os.environ) -> bool:
    """True when JAX will run on the CPU: ``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin is installed."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _hugepages_possible() -> bool:
    if sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return False
    except ValueError:
        return False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        return "[never]" not in thp.read_text()
    except OSError:
        return False


def _off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def settings(env: MutableMapping[str, str] = os.environ) -> dict[str, str | None]:
    """The runtime settings in effect (for benchmark records and ``pixeldit env``)."""
    cache = None if _off(env.get("JAX_ENABLE_COMPILATION_CACHE")) else env.get("JAX_COMPILATION_CACHE_DIR") or None
    return {"xla_flags": env.get("XLA_FLAGS") or None, "glibc_tunables": env.get("GLIBC_TUNABLES") or None,
            "compilation_cache_dir": cache, "attention": env.get(ATTENTION_ENV) or "auto"}


def compilation_cache_dir(env: MutableMapping[str, str] = os.environ) -> Path | None:
    """Where the command caches compiled programs, or ``None`` with ``PIXELDIT_COMPILATION_CACHE=0``.

    ``$PIXELDIT_COMPILATION_CACHE`` when it is a path, else ``$XDG_CACHE_HOME/pixeldit/jax``
    (``~/.cache/pixeldit/jax``).
    """
    value = env.get(_CACHE_ENV, "").strip()
    if _off(value):
        return None
    if value and value.lower() not in ("1", "true", "yes", "on"):
        return Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pixeldit" / "jax"


def configure_compilation_cache(env: MutableMapping[str, str] = os.environ, *, enable: bool = True) -> None:
    """Point JAX's persistent compilation cache at :func:`compilation_cache_dir` (before JAX is imported).

    A ``JAX_COMPILATION_CACHE_DIR`` the user set wins.  ``enable=False`` turns any cache off
    (``pixeldit bench`` measures cold compiles).  The cache holds at most ``CACHE_MAX_BYTES``.
    """
    if not enable:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        return
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = compilation_cache_dir(env)
    if path is None:
        return
    env["JAX_COMPILATION_CACHE_DIR"] = str(path)
    # JAX refuses to use a size-capped cache without ``filelock`` (a dependency of this package);
    # should it be missing anyway, an uncapped cache beats none.
    if importlib.util.find_spec("filelock") is not None:
        env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(CACHE_MAX_BYTES))


def configure_host(argv: Sequence[str] | None = None, env: MutableMapping[str, str] = os.environ,
                   *, reexec: bool = True) -> None:
    """Apply the CPU settings above to ``env``; must run before JAX creates its backend.

    With ``reexec`` (the ``pixeldit`` command) and huge pages not yet enabled, the process
    replaces itself with ``python -m pixeldit <argv[1:]>`` under the new environment; it never
    returns in that case.  A no-op with ``PIXELDIT_HOST_TUNING=0`` or when a GPU/TPU plugin is
    installed.
    """
    if _off(env.get(_OPT_OUT)) or not cpu_only(env):
        return
    env["XLA_FLAGS"] = merge_xla_flags(env.get("XLA_FLAGS", ""), CPU_XLA_FLAGS)
    tunables = env.get("GLIBC_TUNABLES", "")
    if not reexec or "glibc.malloc.hugetlb" in tunables or not _hugepages_possible():
        return
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    argv = list(sys.argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pixeldit", *argv[1:]], dict(env))
