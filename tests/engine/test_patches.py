"""Each patch of vLLM internals still fits the code it patches."""

from __future__ import annotations

import pathlib
import tomllib

import infercept.patches as patches


def test_every_patch_checks_and_applies():
    for patch in patches.ALL:
        patch.check()
        patch.apply()
        patch.check()  # idempotent


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
