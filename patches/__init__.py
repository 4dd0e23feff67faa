"""InferCept's patches of vLLM 0.32.0 internals, one per module; index in README.md.

Installed as `infercept.patches`. Each patch is applied once per process by
the vLLM plugin (`infercept.adapter.plugin.register`), and each module has a
`check()` that fails loudly if the code it patches has changed.
"""

from infercept.patches import engine_core_utility

ALL = (engine_core_utility,)


def apply_all() -> None:
    for patch in ALL:
        patch.apply()
