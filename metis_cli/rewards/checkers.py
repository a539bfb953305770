"""Answer checkers: is an extracted answer equal to the gold answer?

A checker is `checker(prediction, gold) -> bool`, chosen in the recipe as `reward.checker`:
`exact` (case- and whitespace-insensitive string equality), `numeric` (numbers compared as
numbers: "1,234" == "1234.0"), `math_verify` (symbolic equality via the `math-verify` package,
imported only when used). Checkers never raise on odd model output; they answer False. The LLM
judge (`rewards/judge.py`) is the one scorer that can also say "unscored" (None).

A gold answer may be a list of acceptable answers (`best_match`): the prediction is right when it
matches any of them, for every checker.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction

from metis_cli.errors import RecipeError

Checker = Callable[[str, str], bool]
Gold = str | list[str]

_WHITESPACE = re.compile(r"\s+")
# Characters that make a short string worth handing to the LaTeX parser; plain words are not
# (math-verify would read "pairs" as the product p*a*i*r*s and equate it with "paris").
_MATHY = re.compile(r"[\d\\^_+\-*/=()]")


def _normalise_text(text: str) -> str:
    return _WHITESPACE.sub(" ", text.strip()).casefold()


def exact_match(prediction: str, gold: str) -> bool:
    """Equal after trimming, collapsing whitespace runs and ignoring case."""
    return _normalise_text(prediction) == _normalise_text(gold)


def parse_number(text: str) -> Fraction | None:
    """A number written as "1,234", " 1234.0 ", "-3/4", "1e3", "$5" or "12%"; else None.

    Commas are thousands separators ("1,5" reads as 15, not 1.5).
    """
    cleaned = re.sub(r"[\s,_]", "", text)
    cleaned = cleaned.removeprefix("$").removesuffix("%")
    if not cleaned:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_match(prediction: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """Both parse as numbers and agree (exactly, or within rel_tol, e.g. 3.333333 vs 10/3)."""
    predicted, expected = parse_number(prediction), parse_number(gold)
    if predicted is None or expected is None:
        return False
    if predicted == expected:
        return True
    return math.isclose(float(predicted), float(expected), rel_tol=rel_tol, abs_tol=1e-12)


def _math_verify_timeout_s() -> int | None:
    # math-verify's timeout uses signal.alarm, which only works on the main thread; elsewhere
    # (rollout worker threads) it must be off or math-verify raises.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str) -> list:
    from math_verify import parse

    parsed = parse(text, parsing_timeout=_math_verify_timeout_s())
    if not parsed and "$" not in text and _MATHY.search(text):
        parsed = parse(f"${text}$", parsing_timeout=_math_verify_timeout_s())
    return parsed


def math_verify_match(prediction: str, gold: str) -> bool:
    """Symbolically equal according to math-verify ("\\frac{1}{2}" == "0.5", "x+1" == "1+x").

    A gold answer math-verify cannot read as math (a word, a name) falls back to exact_match.
    """
    from math_verify import verify

    try:
        gold_parsed = _math_parse(gold)
        if not gold_parsed:
            return exact_match(prediction, gold)
        predicted = _math_parse(prediction)
        return bool(verify(gold_parsed, predicted, timeout_seconds=_math_verify_timeout_s()))
    except Exception:  # noqa: BLE001 - sympy can fail in many ways on model output; that is "wrong"
        return False


def gold_answers(gold: Gold) -> list[str]:
    """The acceptable answers of a gold answer: itself, or the items of a list."""
    return [gold] if isinstance(gold, str) else list(gold)


def best_match(check: Callable[[str, str], bool | None], prediction: str, gold: Gold) -> bool | None:
    """The best verdict of `check` over every acceptable answer: True if any matches (checked in
    order, stopping at the first match); else None if any could not be scored (a match is still
    possible); else False."""
    undecided = False
    for answer in gold_answers(gold):
        verdict = check(prediction, answer)
        if verdict:
            return True
        undecided = undecided or verdict is None
    return None if undecided else False


CHECKERS: dict[str, Checker] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "math_verify": math_verify_match,
}


def get_checker(name: str) -> Checker:
    """The checker named in the recipe's `reward.checker`."""
    try:
        return CHECKERS[name]
    except KeyError:
        known = ", ".join(CHECKERS)
        raise RecipeError(
            [f"reward.checker: unknown checker {name!r}; use one of: {known}"]
        ) from None
