"""A tiny random-init Llama with a locally trained tokenizer, for engine tests.

Built in about a second, deterministically, with no download: a byte-level BPE
tokenizer trained on a fixed corpus and a 2-layer Llama (hidden 128, head size
32, the smallest the CPU attention backend takes). Speed and token equivalence
need no real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

# A ChatML template with hermes-style tool calls, so vLLM's `hermes` tool
# parser and named tool_choice both work with the tiny model.
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- if m.content %}{{ m.content }}{%- endif %}"
    "{%- for tc in m.tool_calls %}<tool_call>{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments if tc.function.arguments is string "
    "else tc.function.arguments | tojson }}}</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

def build_tiny_model(path: Path, *, num_layers: int = 2, hidden_size: int = 128,
                     layer_types: list[str] | None = None, sliding_window: int | None = None) -> Path:
    """Write a tiny Llama and its tokenizer to `path` (idempotent) and return it.

    `layer_types` ("sliding_attention" / "full_attention" per layer) with `sliding_window`
    mixes sliding-window layers with full-attention ones, as Gemma 3 and gpt-oss do
    (vLLM's Llama reads them per layer).
    """
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(path)
    extra = {}
    if layer_types is not None:
        extra = {"layer_types": list(layer_types), "sliding_window": sliding_window}
        num_layers = len(layer_types)
    _save_random_llama(path, tokenizer, num_layers=num_layers, hidden_size=hidden_size, **extra)
    return path


def _train_tokenizer():
    from benchmarks.random_model import train_tokenizer  # the benchmarks' corpus and BPE

    return train_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE)


def _save_random_llama(path: Path, tokenizer, *, num_layers: int, hidden_size: int,
                       **extra) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Random weights with a larger spread than the default init, so greedy
    # decoding is not stuck on one token and token equivalence is informative.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")))
