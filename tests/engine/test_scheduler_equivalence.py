"""With no interception, InferCept's scheduler generates what stock vLLM does."""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams


@pytest.mark.parametrize("policy", ["min-waste", "vllm"])
def test_batch_is_token_identical_to_stock(intercept_llm, stock, policy):
    llm = intercept_llm(policy)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 400) for _ in range(rng.randint(5, 300))] for _ in range(24)]
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
        use_tqdm=False,
    )
    assert [list(o.outputs[0].token_ids) for o in outputs] == stock.generate(prompts, 48)
