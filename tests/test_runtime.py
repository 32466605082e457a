"""Host runtime settings applied by the ``pixeldit`` command (``pixeldit.runtime``)."""

import json
import os
import subprocess
import sys

import pytest

from pixeldit import runtime


def test_merge_keeps_user_flags_and_adds_missing_ones():
    merged = runtime.merge_xla_flags("--xla_backend_optimization_level=3 --xla_dump_to=/tmp/d",
                                     runtime.CPU_XLA_FLAGS)
    tokens = merged.split()
    assert "--xla_backend_optimization_level=3" in tokens  # the user's value wins
    assert "--xla_backend_optimization_level=1" not in tokens
    assert "--xla_cpu_use_fusion_emitters=false" in tokens and "--xla_dump_to=/tmp/d" in tokens
    assert runtime.merge_xla_flags("", runtime.CPU_XLA_FLAGS) == " ".join(runtime.CPU_XLA_FLAGS)


@pytest.mark.parametrize("env,expect_flags", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),  # an accelerator run keeps XLA's defaults
    ({"JAX_PLATFORMS": "cpu", "PIXELDIT_HOST_TUNING": "0"}, False),  # opt-out
])
def test_configure_host_sets_cpu_flags_only_where_it_should(env, expect_flags):
    env = dict(env)
    runtime.configure_host(["pixeldit"], env, reexec=False)
    assert ("XLA_FLAGS" in env) == expect_flags
    if expect_flags:
        assert env["XLA_FLAGS"].split() == list(runtime.CPU_XLA_FLAGS)
    assert "GLIBC_TUNABLES" not in env  # without re-execution the tunable would have no effect


_OURS = ("XLA_FLAGS", "GLIBC_TUNABLES", "PIXELDIT_HOST_TUNING", "PIXELDIT_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR",
         "JAX_ENABLE_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_MAX_SIZE")


def _env_report(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-m", "pixeldit", "env"], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out)


def test_command_reexecutes_with_huge_pages_and_flags():
    report = _env_report({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert report["backend"] == "cpu"
    assert report["xla_flags"].split() == list(runtime.CPU_XLA_FLAGS)
    if runtime._hugepages_possible():
        # the user's own tunables are kept, the huge-page one appended
        assert report["glibc_tunables"] == "glibc.malloc.check=0:" + runtime.HUGEPAGE_TUNABLE
    else:
        assert report["glibc_tunables"] == "glibc.malloc.check=0"


def test_command_opt_out_changes_nothing():
    report = _env_report({"JAX_PLATFORMS": "cpu", "PIXELDIT_HOST_TUNING": "0", "PIXELDIT_COMPILATION_CACHE": "0"})
    assert report["xla_flags"] is None and report["glibc_tunables"] is None
    assert report["compilation_cache_dir"] is None


def test_command_uses_a_compilation_cache_under_xdg(tmp_path):
    report = _env_report({"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path)})
    assert report["compilation_cache_dir"] == str(tmp_path / "pixeldit" / "jax")


@pytest.mark.parametrize("env,expect", [
    ({"XDG_CACHE_HOME": "/x"}, "/x/pixeldit/jax"),
    ({"XDG_CACHE_HOME": "/x", "PIXELDIT_COMPILATION_CACHE": "/elsewhere"}, "/elsewhere"),
    ({"XDG_CACHE_HOME": "/x", "PIXELDIT_COMPILATION_CACHE": "0"}, None),
    ({"XDG_CACHE_HOME": "/x", "JAX_COMPILATION_CACHE_DIR": "/mine"}, "/mine"),  # the user's own setting wins
])
def test_compilation_cache_location(env, expect):
    env = dict(env)
    runtime.configure_compilation_cache(env)
    assert env.get("JAX_COMPILATION_CACHE_DIR") == expect
    assert runtime.settings(env)["compilation_cache_dir"] == expect


def test_bench_compiles_cold():
    env = {"JAX_COMPILATION_CACHE_DIR": "/mine"}
    runtime.configure_compilation_cache(env, enable=False)
    assert env["JAX_ENABLE_COMPILATION_CACHE"] == "false"
    assert runtime.settings(env)["compilation_cache_dir"] is None
