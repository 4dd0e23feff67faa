"""Text triggers fire on the text the user sees, as vLLM's stop strings do.

InferCept's scheduler is driven with chosen sampled tokens (no model runs): a
request's output is a sequence of token ids picked from marker pieces, special
tokens and other text. The oracle is vLLM's own detokenizer
(`IncrementalDetokenizer`, as the front-end builds one) with the trigger as a stop
string on the same tokens: InferCept pauses on exactly the token at which vLLM's
stop string fires, for `skip_special_tokens` on and off. A marker whose characters
are separated by special tokens (EOS, the pad token) is visible text when special
tokens are skipped, so both fire; a trigger that is one special token (a tool
parser's end token) fires by id either way.
"""

from __future__ import annotations

import pytest
from async_scheduler_harness import build_scheduler, make_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROMPT = list(range(40, 60))
MARKER = "<<END>>"


@pytest.fixture(scope="module")
def scheduler(tiny_model):
    return build_scheduler(tiny_model, "preserve", connector=False, async_scheduling=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def alphabet(tokenizer):
    """Token ids by kind: a text's characters one token each, special tokens, other text."""
    def chars(text):
        return [tokenizer.encode(c, add_special_tokens=False)[0] for c in dict.fromkeys(text)]

    special = [tokenizer.eos_token_id, tokenizer.pad_token_id,
               *tokenizer.encode("<tool_call>", add_special_tokens=False)]
    other = tokenizer.encode(" the quick brown fox, 42", add_special_tokens=False)
    return chars, special, other


def pause_index(scheduler, tokens, triggers, skip_special_tokens, request_id):
    """Feed `tokens` one step at a time; the number of tokens at the pause (None: none)."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus

    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    request = make_request(request_id, PROMPT, max_tokens=len(tokens) + 1,
                           infercept={"triggers": list(triggers)})
    request.sampling_params.skip_special_tokens = skip_special_tokens
    scheduler.add_request(request)
    paused_at = None
    for i, token in enumerate(tokens):
        output = scheduler.schedule()
        assert list(output.num_scheduled_tokens) == [request_id]
        scheduler.update_from_output(output, ModelRunnerOutput(
            req_ids=[request_id], req_id_to_index={request_id: 0}, sampled_token_ids=[[token]],
            logprobs=None, prompt_logprobs_dict={}, pooler_output=[]))
        if request_id in scheduler.intercepts:
            paused_at = i + 1
            break
    scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
    scheduler.schedule()  # an empty step hands the finished id on
    assert not scheduler.has_requests() and request_id not in scheduler.intercepts
    assert pool.get_num_free_blocks() == free_before
    return paused_at


def vllm_stop_index(tokenizer, tokens, stop, skip_special_tokens):
    """Where vLLM's detokenizer stops the same output on `stop` as a stop string."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    params = SamplingParams(stop=list(stop), include_stop_str_in_output=True,
                            skip_special_tokens=skip_special_tokens, max_tokens=len(tokens) + 1)
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, EngineCoreRequest(
        "oracle", PROMPT, None, params, None, 0.0, None, None, None))
    for i, token in enumerate(tokens):
        if detokenizer.update([token], stop_terminated=False) is not None:
            return i + 1
    return None


def test_marker_split_by_special_tokens_pauses_where_the_user_sees_it(scheduler, tokenizer):
    """The reported case: EOS and the pad token between a marker's characters."""
    marker = [tokenizer.encode(c, add_special_tokens=False)[0] for c in MARKER]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    before = tokenizer.encode(" x", add_special_tokens=False)
    tokens = [*before, *marker[:3], eos, pad, *marker[3:], *tokenizer.encode(" after", add_special_tokens=False)]
    shown = tokenizer.decode(tokens, skip_special_tokens=True)
    assert MARKER in shown and MARKER not in tokenizer.decode(tokens, skip_special_tokens=False)
    expected = len(before) + len(marker) + 2  # the marker's last character
    assert vllm_stop_index(tokenizer, tokens, [MARKER], True) == expected
    assert pause_index(scheduler, tokens, [MARKER], True, "split-skip") == expected
    # Special tokens shown: the marker is not in the text, and neither fires.
    assert vllm_stop_index(tokenizer, tokens, [MARKER], False) is None
    assert pause_index(scheduler, tokens, [MARKER], False, "split-show") is None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_token_trigger_fires_by_id(scheduler, tokenizer, skip_special_tokens):
    """A tool parser's end token pauses even when the request hides special tokens."""
    end = tokenizer.encode("</tool_call>", add_special_tokens=False)
    assert len(end) == 1 and tokenizer.decode(end, skip_special_tokens=True) == ""
    tokens = [*tokenizer.encode(' {"name": "f"}', add_special_tokens=False), *end, 300, 301]
    assert pause_index(scheduler, tokens, ["</tool_call>"], skip_special_tokens,
                       f"special-{skip_special_tokens}") == len(tokens) - 2


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_trigger_completed_late_in_a_long_output(scheduler, tokenizer, skip_special_tokens):
    """Many special tokens before the last character: the decoded tail grows to hold it."""
    marker = [tokenizer.encode(c, add_special_tokens=False)[0] for c in MARKER]
    filler = tokenizer.encode(" some words before it", add_special_tokens=False)
    tokens = [*filler, *marker[:-1], *[tokenizer.eos_token_id] * 40, marker[-1], *filler]
    expected = vllm_stop_index(tokenizer, tokens, [MARKER], skip_special_tokens)
    assert (expected is not None) == skip_special_tokens
    assert pause_index(scheduler, tokens, [MARKER], skip_special_tokens,
                       f"late-{skip_special_tokens}") == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_pauses_where_vllms_stop_string_fires(scheduler, tokenizer, alphabet, data, skip_special_tokens):
    """Any output over marker pieces, special tokens and text: InferCept pauses on the
    token where vLLM's stop string fires on the same output, and never elsewhere."""
    chars, special, other = alphabet
    trigger = data.draw(st.sampled_from([MARKER, ">>", "<E", "fox", "42"]))
    token = st.one_of(st.sampled_from(chars(trigger)), st.sampled_from(special), st.sampled_from(other))
    tokens = data.draw(st.lists(token, min_size=1, max_size=40))
    expected = vllm_stop_index(tokenizer, tokens, [trigger], skip_special_tokens)
    pause_index.counter = getattr(pause_index, "counter", 0) + 1
    assert pause_index(scheduler, tokens, [trigger], skip_special_tokens,
                       f"prop-{pause_index.counter}") == expected
