"""A Llama of a chosen size with random weights, and a small tokenizer, for the benchmarks.

Only the config and the tokenizer are written: the engines load the model with vLLM's
``load_format="dummy"`` (random weights drawn at load time), so even a 6B-class model
costs no disk and no download. Forward time depends on the shapes alone, and the
benchmarks sample greedily with ``ignore_eos``, so the weights' values never matter.

The tokenizer is a byte-level BPE trained on a fixed corpus (deterministic, about a
second); the model's vocabulary is the tokenizer's, so every sampled id decodes. The
output head of a real 32k-50k vocabulary is under 1% of a 6B model's compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HEAD_SIZE = 64
_STAMP = "infercept_benchmark_model.json"

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Compute 12 * 7 with the calculator: <calc>12*7</calc> = 84.",
    "Search the web for the tallest mountain, then answer in one sentence.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "search", "arguments": {"query": "weather in Paris"}}',
    "Agents call tools: a calculator, a search engine, a game environment, a human.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
)


@dataclass(frozen=True)
class ModelShape:
    """A Llama's shape; the attention heads are ``HEAD_SIZE`` wide unless the model is
    narrower than one head of that size."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_kv_heads: int
    max_position_embeddings: int = 4096

    @property
    def head_size(self) -> int:
        return min(HEAD_SIZE, self.hidden_size)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * dtype_bytes

    def __post_init__(self) -> None:
        if self.hidden_size % self.head_size or self.num_heads % self.num_kv_heads:
            raise ValueError(f"heads do not divide the hidden size evenly: {self}")


def build_random_model(path: str | Path, shape: ModelShape) -> Path:
    """Write a Llama config of ``shape`` and a tokenizer to ``path`` (reused when the
    folder already holds the same shape) and return the folder."""
    path = Path(path)
    stamp = path / _STAMP
    wanted = json.dumps(shape.__dict__, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(path)
    _llama_config(tokenizer, shape).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}))
    stamp.write_text(wanted)
    return path


def special_token_ids(path: str | Path) -> list[int]:
    """Ids of the tokenizer's special tokens, which traces keep out of prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return sorted(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))


def train_tokenizer(special_tokens=SPECIAL_TOKENS, chat_template: str | None = None):
    """A byte-level BPE of ``TOKENIZER_VOCAB_SIZE`` trained on a fixed corpus:
    deterministic, about a second, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def _llama_config(tokenizer, shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
