"""The `calculator` tool: arithmetic on numbers by walking the expression's syntax tree.

Only number literals, + - * / // % **, unary +/- and parentheses are evaluated; names, calls,
attributes and everything else are refused, so model text is never executed. Results that would
be huge (`9**9**9`) are refused before they are computed. Integer results print as integers
("5535", and "5" for 10/2) so answers compare cleanly.
"""

from __future__ import annotations

import ast
import math
import operator
import time

from metis_cli.agent.tools.base import ToolErrorKind, ToolResult, error_result

MAX_EXPRESSION_CHARS = 1_000
# About 3,000 decimal digits: far beyond any real answer, cheap to compute and to print.
MAX_RESULT_BITS = 10_000
# Integral floats below this print as integers; above it float rounding makes digits up.
_EXACT_FLOAT_LIMIT = 2**53

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_HINTS = {
    ast.BitXor: "'^' is not a power here; use ** (2**10)",
    ast.Name: "names are not allowed; use numbers only",
    ast.Call: "function calls are not allowed; use + - * / // % ** and parentheses",
    ast.Attribute: "attributes are not allowed; use numbers only",
    ast.Tuple: "commas are not allowed; write 1000, not 1,000, and one expression per call",
}


class CalculationError(ValueError):
    """The expression is not plain arithmetic, or its result is out of range."""


def _check_size(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise CalculationError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise CalculationError("the result is too large (more than about 3,000 digits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError("the result is not a finite number")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    # Estimate the size before computing: 9**9**9 would take minutes and gigabytes.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_RESULT_BITS:
            raise CalculationError("the result is too large (more than about 3,000 digits)")
    if base == 0 and exponent < 0:
        raise CalculationError("zero cannot be raised to a negative power")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculationError(f"only numbers are allowed, got {node.value!r}")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculationError("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    operation = node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node
    hint = _HINTS.get(type(operation), f"{type(operation).__name__} is not arithmetic")
    raise CalculationError(hint)


def format_number(value: int | float) -> str:
    """5535 -> "5535"; 5.0 -> "5"; 1/3 -> "0.333333333333" (12 significant digits)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT:
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".12g")
    return str(value)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression; raise CalculationError explaining what is not allowed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise CalculationError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise CalculationError(f"could not parse the expression: {error.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalculationError("could not parse the expression: nested too deeply") from None
    try:
        return format_number(_evaluate(tree))
    except RecursionError:
        raise CalculationError("the expression is nested too deeply") from None
    except OverflowError:
        raise CalculationError("the result is too large") from None


class CalculatorTool:
    """Arithmetic on numbers, evaluated safely in-process."""

    name = "calculator"
    # Kept short on purpose: the spec is rendered into every prompt's system turn, and the tiny
    # model's tokenizer is trained on exactly this text (data/synthetic.py CALCULATOR_TOOL_SPEC, kept equal by a test).
    description = "Evaluate an arithmetic expression."
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "The expression to evaluate."}},
        "required": ["expression"],
        "additionalProperties": False,
    }

    async def call(self, arguments: dict) -> ToolResult:
        started = time.perf_counter()
        try:
            text = calculate(arguments["expression"])
        except CalculationError as error:
            return error_result(ToolErrorKind.TOOL_ERROR, str(error), time.perf_counter() - started)
        return ToolResult(text=text, runtime_s=time.perf_counter() - started)
