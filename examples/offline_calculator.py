"""A calculator the model calls mid-sentence, with `infercept.LLM` on the embedded default model.

The model (SmolLM2-135M-Instruct, converted once into ~/.cache/infercept) writes
`<calc>EXPRESSION</calc>`; the request pauses there, the expression is
evaluated (safely, with `ast`), the result is appended, and the model goes on.
A 135M model uses the tool only when shown how, so the prompt is few-shot.

    python examples/offline_calculator.py
"""

from __future__ import annotations

import ast
import json
import operator

from infercept import LLM, Augmentation, SamplingParams

FEW_SHOT = """Use the calculator for arithmetic: write <calc>expression</calc> and its result follows.

Question: What is 12 times 7?
Answer: 12 times 7 is <calc>12*7</calc>84.
Question: How much is 345 plus 89?
Answer: 345 plus 89 is <calc>345+89</calc>434.
Question: What is 100 minus 58?
Answer: 100 minus 58 is <calc>100-58</calc>42.
Question: {question}
Answer:"""

QUESTIONS = ["What is 1234 times 56?", "How much is 987 plus 2468?", "What is 5000 minus 1234?"]

_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def evaluate(expression: str) -> int | float:
    """Arithmetic on numbers only: + - * / // % ** and parentheses; anything else raises ValueError."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    return value(ast.parse(expression.strip(), mode="eval").body)


def calculate(expression: str) -> str:
    result = evaluate(expression.replace("x", "*").replace("×", "*"))
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def main() -> None:
    llm = LLM(
        model=None,  # the embedded default model
        intercept_policy="min-waste",
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
    )
    calculator = Augmentation(
        name="calculator", start="<calc>", end="</calc>", call=calculate,
        on_error=lambda exc: "?",  # a malformed expression gets "?" and the model goes on
    )
    prompts = [FEW_SHOT.format(question=q) for q in QUESTIONS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, stop=["\n"]),
                           augmentations=[calculator])
    for question, output in zip(QUESTIONS, outputs):
        print(f"\nQuestion: {question}\nAnswer:{output.outputs[0].text}")
        print("interceptions:")
        for record in output.interceptions:
            summary = {k: record.to_dict()[k] for k in ("name", "args", "result", "error", "duration_s")}
            summary["decisions"] = [d["action"] for d in record.decisions]
            print("  " + json.dumps(summary))


if __name__ == "__main__":
    main()
