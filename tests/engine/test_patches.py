"""Each patch of vLLM internals still fits the code it patches."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

import infercept
import infercept.patches as patches
from infercept.adapter import plugin, version
from infercept.adapter.version import UnsupportedVllmVersion


def test_every_patch_checks_and_applies():
    for patch in patches.ALL:
        patch.check()
        patch.apply()
        patch.check()  # idempotent


def test_the_plugin_checks_the_vllm_version_before_patching(monkeypatch):
    """On another vLLM, `register()` raises before it patches anything, on every call."""
    done = []
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "_init_cpu_amx", lambda: done.append("amx"))
    monkeypatch.setattr(patches, "apply_all", lambda: done.append("patched"))
    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.33.0")
    for _ in range(2):  # a failed check is not remembered as registered
        with pytest.raises(UnsupportedVllmVersion, match="pinned to vLLM 0.32.0 but vLLM 0.33.0 is installed"):
            plugin.register()
        assert done == [] and plugin._registered is False
    monkeypatch.setattr(version, "installed_vllm_version", lambda: infercept.VLLM_VERSION)
    plugin.register()
    plugin.register()  # once per process
    assert done == ["amx", "patched"]


def test_vllm_lets_a_general_plugins_error_stop_the_process():
    """`register()`'s version error reaches the user: vLLM calls general plugins unguarded."""
    import inspect

    from vllm.plugins import load_general_plugins

    source = inspect.getsource(load_general_plugins)
    assert "func()" in source and "except" not in source, (
        "vLLM now guards general plugins: revisit how infercept/adapter/plugin.py fails on another vLLM")


def test_engine_core_utility_reaches_the_scheduler(intercept_llm):
    llm = intercept_llm("preserve")
    core = llm.llm_engine.engine_core.engine_core
    stats = core.infercept("stats")
    assert stats["policy"] == "preserve" and "recomputed_tokens" in stats
    assert core.infercept("states") == {}


def test_every_package_is_installed():
    root = pathlib.Path(__file__).parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(root).parts)
        for path in (root / "infercept").rglob("__init__.py")
    }
    assert found | {"infercept.patches"} == listed
