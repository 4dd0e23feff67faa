"""Fetch vLLM 0.32.0's scheduler tests from its PyPI sdist, at test time.

vLLM's files are never committed here: the pinned sdist is downloaded, its
sha256 checked, and only the test files the gate runs (and the package files
and helpers they import) are extracted into a cache directory outside git,
reused while present:

    ${INFERCEPT_CACHE_DIR:-~/.cache/infercept}/vllm-gate/vllm-0.32.0-<sha256[:12]>/

`INFERCEPT_VLLM_SDIST=/path/to/vllm-0.32.0.tar.gz` uses a local copy of the
sdist instead of downloading it (its sha256 is checked all the same).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/d5/df/"
    "5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/vllm-0.32.0.tar.gz"
)
SDIST_SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"
PREFIX = f"vllm-{VLLM_VERSION}/"

# What the two test files import from vLLM's `tests` package:
#   tests/v1/core/utils.py       -> tests.v1.kv_connector.unit.utils (MockKVConfig,
#                                   MockKVConnector's registration)
#   tests/v1/core/test_scheduler -> tests.v1.core.test_prefix_caching,
#                                   tests.v1.kv_connector.unit.utils
# vLLM's top-level tests/conftest.py is not extracted: it imports vLLM's whole
# test tooling (HF runners, assets, tblib); the one fixture these files use
# from it (`caplog_vllm`) is provided by the gate's plugin.
EXTRACT_DIRS = ("tests/v1/core/",)
EXTRACT_FILES = (
    "tests/__init__.py",
    "tests/v1/__init__.py",
    "tests/v1/kv_connector/__init__.py",
    "tests/v1/kv_connector/unit/__init__.py",
    "tests/v1/kv_connector/unit/utils.py",
)
TEST_FILES = ("tests/v1/core/test_scheduler.py", "tests/v1/core/test_async_scheduler.py")
_COMPLETE = ".complete"


class FetchError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("INFERCEPT_CACHE_DIR") or Path.home() / ".cache" / "infercept"
    return Path(base) / "vllm-gate"


def tests_dir() -> Path:
    """Where the extracted tests live (the pytest rootdir of the gate's runs)."""
    return cache_root() / f"vllm-{VLLM_VERSION}-{SDIST_SHA256[:12]}"


def fetch(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the directory holding vLLM's extracted tests, fetching them if needed."""
    target = tests_dir()
    stamp = target / _COMPLETE
    if stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        sdist = _sdist(Path(tmp), log)
        staging = Path(tmp) / "tree"
        _extract(sdist, staging)
        (staging / _COMPLETE).write_text(SDIST_SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            # Another process put it there meanwhile: use theirs if complete.
            if not (stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256):
                raise
    log(f"vllm gate: vLLM {VLLM_VERSION}'s scheduler tests extracted to {target}")
    return target


def _sdist(tmp: Path, log) -> Path:
    local = os.environ.get("INFERCEPT_VLLM_SDIST")
    if local:
        path = Path(local)
        if not path.is_file():
            raise FetchError(f"INFERCEPT_VLLM_SDIST={local} is not a file")
    else:
        path = tmp / f"vllm-{VLLM_VERSION}.tar.gz"
        log(f"vllm gate: downloading {SDIST_URL}")
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=60) as response, open(path, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as exc:
            raise FetchError(
                f"could not download vLLM {VLLM_VERSION}'s sdist from {SDIST_URL}: {exc}. "
                "The vLLM scheduler gate needs it (about 45 MB, once; cached under "
                f"{cache_root()}). Download it by hand and set "
                "INFERCEPT_VLLM_SDIST=/path/to/vllm-0.32.0.tar.gz to use it offline."
            ) from exc
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        raise FetchError(
            f"{path}: sha256 {digest.hexdigest()}, expected {SDIST_SHA256} "
            f"(vLLM {VLLM_VERSION}'s sdist as PyPI lists it); refusing to use it"
        )
    return path


def _wanted(name: str) -> bool:
    if not name.startswith(PREFIX):
        return False
    rel = name[len(PREFIX):]
    return rel in EXTRACT_FILES or any(rel.startswith(d) for d in EXTRACT_DIRS)


def _extract(sdist: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar:
            if _wanted(member.name) and (member.isfile() or member.isdir()):
                member.name = member.name[len(PREFIX):]
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    missing = [p for p in (*EXTRACT_FILES, *TEST_FILES, "tests/v1/core/utils.py")
               if not (dest / p).is_file()]
    if missing:
        raise FetchError(f"vLLM {VLLM_VERSION}'s sdist lacks {', '.join(missing)}")


if __name__ == "__main__":
    print(fetch())
