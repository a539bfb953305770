"""Reading a recipe: YAML file -> `--set` overrides -> `${a.b}` interpolation -> validated `Recipe`.

Every problem is collected and raised at once as one `RecipeError`, each line naming the field
path, what is wrong, and where in the YAML it sits (`hdpo.w_tool: must be >= 0, got -1
(recipes/x.yaml line 12)`). Nothing here imports torch or other heavy libraries.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from metis_cli.errors import RecipeError
from metis_cli.recipe.schema import SYNTHETIC_PREFIX, SYNTHETIC_SETS, Recipe

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
BUILTIN_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
"""The recipes shipped inside the package (the repository's recipes/ links here), so a pipx user
can run `metis run tiny` or copy one with `metis recipes copy`."""
RECIPE_DIR_KEY = "recipe_dir"
"""`${recipe_dir}` in a recipe: the folder the recipe file is in, so a recipe can name files
shipped next to it wherever it is run from."""


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of every built-in recipe."""
    return {path.stem: path for path in sorted(BUILTIN_RECIPES.glob("*.yaml"), key=lambda path: path.stem)}


def resolve_recipe_path(path: str | Path) -> Path:
    """`path` itself, or the built-in recipe of that name when `path` is a bare name (no such
    file, no folder part, no suffix): `metis run tiny` works from any folder."""
    path = Path(path)
    if path.exists() or path.parent != Path(".") or path.suffix:
        return path
    return builtin_recipes().get(path.name, path)
_MAX_INTERPOLATION_DEPTH = 10

FieldPath = tuple[str | int, ...]


def dotted(path: FieldPath) -> str:
    """('data', 'rl', 0, 'path') -> 'data.rl[0].path'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<recipe>"


# ------------------------------------------------------------------------------- reading YAML
def _read_yaml(path: Path) -> tuple[dict, dict[FieldPath, int]]:
    """Parse the file; return the mapping and the 1-based line of every key path in it."""
    where = str(path)
    if not path.exists():
        names = ", ".join(builtin_recipes())
        raise RecipeError([f"recipe file not found: {where} (check the path, or name a built-in recipe: {names})"])
    if path.is_dir():
        raise RecipeError([f"{where} is a directory, expected a recipe YAML file"])
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise RecipeError([f"{where} is binary data, not a YAML recipe"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError([f"{where} is not UTF-8 text (byte {error.start}); save it as UTF-8"]) from None
    if not text.strip():
        raise RecipeError([f"{where} is empty; a recipe needs at least a 'model' section"])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError([f"YAML syntax error at {where}{line}: {problem}"]) from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise RecipeError([f"{where} must hold a mapping of sections (run, model, ...), got a {kind}"])
    lines: dict[FieldPath, int | str] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node, path: FieldPath, lines: dict[FieldPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            lines[key_path] = key_node.start_mark.line + 1
            _collect_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*path, index), lines)


# --------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[FieldPath, Any]:
    """'hdpo.w_tool=0.2' -> (('hdpo', 'w_tool'), 0.2); values are parsed as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([f"--set {text!r}: expected section.field=value, e.g. --set hdpo.w_tool=0.15"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    return path, parsed


def _apply_override(data: dict, path: FieldPath, value: Any, origin: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError([f"{origin}: {dotted(path[: depth + 1])} does not exist"])
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError([f"{origin}: {dotted(path[:depth])} is not a section"])
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError([f"{origin}: {dotted(path)} does not exist"])
    elif not isinstance(node, dict):
        raise RecipeError([f"{origin}: {dotted(path[:-1])} is not a section"])
    node[last] = value


# ------------------------------------------------------------------------------ interpolation
def _lookup(root: dict, key: str) -> Any:
    node: Any = root
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(key)
    return node


def _interpolate(root: dict, recipe_dir: Path | None = None) -> list[tuple[FieldPath, str]]:
    """Resolve `${a.b}` (and `${recipe_dir}`) in every string of `root` in place; return
    (path, problem) pairs."""
    problems: list[tuple[FieldPath, str]] = []

    def resolve(value: str, path: FieldPath, depth: int) -> str:
        if depth > _MAX_INTERPOLATION_DEPTH:
            raise ValueError(f"interpolation loop in {value!r}")

        def replace(match: re.Match) -> str:
            key = match.group(1).strip()
            if key == RECIPE_DIR_KEY:
                if recipe_dir is None:
                    raise ValueError(f"${{{key}}} needs a recipe file (this recipe did not come from one)")
                return str(recipe_dir)
            try:
                target = _lookup(root, key)
            except KeyError:
                raise ValueError(f"${{{key}}} refers to a missing key '{key}'") from None
            if isinstance(target, (dict, list)):
                raise ValueError(f"${{{key}}} refers to a section, not a value")
            return resolve(str(target), path, depth + 1)

        return _INTERPOLATION.sub(replace, value)

    def walk(node: Any, path: FieldPath) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, str) and "${" in value:
                try:
                    node[key] = resolve(value, (*path, key), 0)
                except ValueError as error:
                    problems.append(((*path, key), str(error)))
            elif isinstance(value, (dict, list)):
                walk(value, (*path, key))

    walk(root, ())
    return problems


# -------------------------------------------------------------------------------- validation
def _fields_at(path: FieldPath) -> list[str]:
    """Field names of the section model at `path` (for 'did you mean' hints)."""
    model: Any = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _unwrap(model.model_fields[part].annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / list[X] / dict[str, X] -> X when X is a section model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _describe(error: dict) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path = tuple(error["loc"])
    if kind == "extra_forbidden":
        name = str(path[-1])
        choices = _fields_at(path[:-1])
        what = "section" if len(path) == 1 else "key"
        hint = difflib.get_close_matches(name, choices, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(choices)})"
        return f"unknown {what} '{name}'{suggestion}"
    if kind == "missing":
        return "required field is missing"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {value!r}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {value!r}"


def _located(path: FieldPath, message: str, lines: dict[FieldPath, int | str], source: str | None) -> str:
    line = None
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            line = lines[path[:cut]]
            break
    if isinstance(line, str):  # the value came from a --set override
        where = f" ({line})"
    elif source and line:
        where = f" ({source} line {line})"
    else:
        where = f" ({source})" if source else ""
    return f"{dotted(path)}: {message}{where}"


def _check_semantics(recipe: Recipe) -> list[tuple[FieldPath, str]]:
    """Cross-field rules a schema type cannot express."""
    problems: list[tuple[FieldPath, str]] = []
    if recipe.reward.checker == "judge" and recipe.reward.judge is None:
        problems.append((("reward", "judge"), "checker 'judge' needs a reward.judge section (base_url, model)"))
    if "search" in recipe.tools.enabled and recipe.tools.search.backend == "http":
        if not recipe.tools.search.http.url:
            problems.append((("tools", "search", "http", "url"), "search backend 'http' needs the search API's url"))
    elif "search" in recipe.tools.enabled:
        corpus = recipe.tools.search.corpus
        if not corpus:
            problems.append((("tools", "search", "corpus"), "the search tool needs a corpus JSONL file"))
        elif not Path(corpus).is_file():
            problems.append((("tools", "search", "corpus"), f"file not found: {corpus}"))
    sources = [(("data", "rl", i), s) for i, s in enumerate(recipe.data.rl)]
    sources += [(("data", "eval", i), s) for i, s in enumerate(recipe.data.eval)]
    sources += [(("curate", "input", i), s) for i, s in enumerate(recipe.curate.input)]
    for p, phase in enumerate(recipe.sft.phases):
        sources += [(("sft", "phases", p, "data", i), s) for i, s in enumerate(phase.data)]
    for path, source in sources:
        if source.path.startswith(SYNTHETIC_PREFIX):
            name = source.path.removeprefix(SYNTHETIC_PREFIX)
            if name not in SYNTHETIC_SETS:
                problems.append(((*path, "path"), f"unknown synthetic set '{name}' (known: {', '.join(sorted(SYNTHETIC_SETS))})"))
        elif not source.path.startswith("hf:") and not Path(source.path).exists():
            problems.append(((*path, "path"), f"file not found: {source.path}"))
    if recipe.rollout.max_new_tokens > recipe.rollout.max_total_tokens:
        problems.append((("rollout", "max_new_tokens"), "must be <= rollout.max_total_tokens"))
    response = recipe.rollout.max_response_tokens
    if response is not None and response >= recipe.rollout.max_total_tokens:
        problems.append((("rollout", "max_response_tokens"), "must be < rollout.max_total_tokens, which also counts "
                         "the prompt (set max_total_tokens to the longest prompt + max_response_tokens)"))
    if recipe.hdpo.mini_batches > recipe.hdpo.prompts_per_step:
        problems.append((("hdpo", "mini_batches"), f"a mini-batch holds whole groups: at most hdpo.prompts_per_step "
                         f"({recipe.hdpo.prompts_per_step}) mini-batches"))
    return problems


def validate_data(data: dict, *, source: str | None = None, lines: dict | None = None,
                  recipe_dir: Path | None = None) -> Recipe:
    """Validate an already-loaded mapping (after overrides) into a `Recipe`, or raise RecipeError.
    `recipe_dir` is what `${recipe_dir}` stands for (the recipe file's folder)."""
    lines = lines or {}
    data = copy.deepcopy(data)
    try:
        Recipe.model_validate(data)  # first pass: shape errors, before interpolating nonsense
    except ValidationError as error:
        raise RecipeError(
            [_located(tuple(e["loc"]), _describe(e), lines, source) for e in error.errors()]
        ) from None
    resolved = Recipe.model_validate(data).model_dump(mode="python")
    interpolation_problems = _interpolate(resolved, recipe_dir)
    if interpolation_problems:
        raise RecipeError([_located(p, m, lines, source) for p, m in interpolation_problems])
    try:
        recipe = Recipe.model_validate(resolved)
    except ValidationError as error:
        raise RecipeError(
            [_located(tuple(e["loc"]), _describe(e), lines, source) for e in error.errors()]
        ) from None
    semantic = _check_semantics(recipe)
    if semantic:
        raise RecipeError([_located(p, m, lines, source) for p, m in semantic])
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override, interpolate and validate a recipe file (or built-in recipe name); raise
    RecipeError listing every problem."""
    path = resolve_recipe_path(path)
    data, lines = _read_yaml(path)
    for text in overrides or []:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value, f"--set {text}")
        lines[key_path] = f"--set {text}"
    return validate_data(data, source=str(path), lines=lines, recipe_dir=path.resolve().parent)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what `metis validate --print` shows and run folders keep)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
