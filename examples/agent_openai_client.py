"""An agent on the official `openai` client against `infercept serve`.

Start the server (`scripts/serve.sh`), then run `python examples/agent_openai_client.py`.
The agent answers a question with two tools: a fast calculator and a slow web
search. Each tool call intercepts the request inside the server; the agent's
next request (the conversation with the tool's result appended) resumes it,
with no change to the client. Per turn it prints whether the request was
resumed and how many context tokens the server did not recompute.

A small model rarely calls tools by itself, so the agent names the tool for
each step, as a scripted workflow does: vLLM's structured outputs hold the
model to that tool's call (in the hermes `<tool_call>` format the server's
tool parser reads) while the model writes the arguments. The last step answers.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import time

from openai import OpenAI

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
]

# The call of each tool, with the model free to write the argument.
CALL_PATTERNS = {
    "search": re.escape('<tool_call>{"name": "search", "arguments": {"query": "') + r'[A-Za-z0-9 ,.?]{1,40}'
              + re.escape('"}}</tool_call>'),
    "calculator": re.escape('<tool_call>{"name": "calculator", "arguments": {"expression": "')
                  + r'[0-9 +\-*/().]{1,24}' + re.escape('"}}</tool_call>'),
}

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.USub: operator.neg, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """Arithmetic only: numbers and + - * / ** (no names, no calls)."""
    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError("not arithmetic")
    try:
        return str(evaluate(ast.parse(expression, mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError) as error:
        return f"error: {error}"


def search(query: str, delay_s: float = 1.0) -> str:
    time.sleep(delay_s)  # a slow tool: the server decides what to do with the paused KV
    return f"Top result for {query!r}: Paris has been the capital of France since 987."


def run_tool(name: str, arguments: str, search_delay_s: float) -> str:
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return "error: arguments are not JSON"
    if not isinstance(args, dict):
        return "error: arguments must be an object"
    if name == "calculator":
        return calculator(str(args.get("expression", "")))
    return search(str(args.get("query", "")), search_delay_s)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--search-delay-s", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": "How many years has Paris been the capital of "
                                            "France, as of 2024? Search, then calculate."}]
    turns = []
    for step, tool in enumerate(["search", "calculator", None]):
        extra = {"structured_outputs": {"regex": CALL_PATTERNS[tool]}} if tool else None
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="auto" if tool else "none",
            temperature=0, max_tokens=args.max_tokens, extra_body=extra)
        info = reply.model_extra.get("infercept") or {}
        message = reply.choices[0].message
        turns.append({"step": step, "resumed_from": info.get("resumed_from"),
                      "reused_tokens": info.get("reused_tokens", 0),
                      "intercept_id": info.get("intercept_id"),
                      "tool_calls": [c.function.name for c in message.tool_calls or ()]})
        print(f"turn {step}: resumed={info.get('resumed_from') is not None} "
              f"reused_tokens={info.get('reused_tokens', 0)} "
              f"intercepted={info.get('intercept_id') is not None} "
              f"tool_calls={turns[-1]['tool_calls']}")
        if not message.tool_calls:
            print("answer:", message.content)
            break
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = run_tool(call.function.name, call.function.arguments, args.search_delay_s)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return turns


if __name__ == "__main__":
    main()
