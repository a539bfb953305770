"""The grid of `metis sweep`: `--set field=v1,v2,...` lists -> variants, checked before anything runs.

A `--set` with one value is a fixed override, as in every other command; with several
(comma-separated at the top level, so `[a, b]` and `"a,b"` stay one value) it is an axis of the
grid, and the variants are the cartesian product of the axes in the order given. A `--variant
"field=value field=value"` names one point explicitly (conditions a product cannot express, e.g.
hdpo beside coupled at two penalties); each is crossed with the axes. Each value is
parsed exactly as `--set` parses it (`recipe.load.parse_override`), and every variant's whole
recipe is validated with `load_recipe`, so a bad field or value stops the sweep before anything
runs, with every problem named at once (field, value, which `--set`). Torch-free.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from metis_cli.errors import RecipeError

RESERVED_FIELDS = {
    "run.seed": "give seeds with --seeds N or --seed-list 0,1,2",
    "run.output_dir": "the sweep places every run in its folder (--out)",
    "sft.output": "the sweep places the sft stages in its folder (--out)",
    "hdpo.output": "the sweep places the hdpo stages in its folder (--out)",
    "eval.output": "the sweep places the eval folders in its folder (--out)",
}
"""Fields the sweep sets itself, so a grid may not."""
_SLUG_MAX = 80


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple[str, ...]  # the value texts as given, e.g. ("0.1", "0.15")


@dataclass(frozen=True)
class Variant:
    """One point of the grid: `overrides` (`field=value` texts) on top of the fixed ones."""

    name: str  # for people: "w_tool=0.1 estimator=hdpo" ("recipe" when the grid has no axis)
    slug: str  # folder name: "w_tool-0.1_estimator-hdpo"
    overrides: tuple[str, ...]


def split_values(text: str, separator: str = ",") -> list[str]:
    """'0.1, 0.2' -> ['0.1', '0.2']; separators inside [], {} or quotes do not split. With
    separator " ", any run of whitespace splits and empty parts are dropped."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif depth == 0 and (char == separator or (separator == " " and char.isspace())):
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return [v for v in values if v] if separator == " " else values


def parse_variant_sets(texts: list[str], axes: list[Axis]) -> list[tuple[str, ...]]:
    """The `--variant "field=value field=value"` options: each an explicit point, crossed with the
    grid's axes; RecipeError naming every bad one."""
    from metis_cli.recipe.load import parse_override

    problems: list[str] = []
    sets: list[tuple[str, ...]] = []
    on_axes = {axis.field for axis in axes}
    for text in texts:
        items = split_values(text, " ")
        fields = [item.partition("=")[0].strip() for item in items]
        origin = f"(--variant {text!r})"
        if not items:
            problems.append(f"--variant {text!r}: empty; give field=value pairs separated by spaces")
        for item, field in zip(items, fields):
            try:
                parse_override(item)
            except RecipeError as error:
                problems += [f"{p} {origin}" for p in error.problems]
                continue
            reserved = next((r for r in RESERVED_FIELDS if r == field or r.startswith(field + ".")), None)
            if reserved:
                problems.append(f"{field}: set by metis sweep itself: {RESERVED_FIELDS[reserved]} {origin}")
            elif field in on_axes:
                problems.append(f"{field}: both in a --variant and a grid axis; give it in one place {origin}")
            elif fields.count(field) > 1:
                problems.append(f"{field}: given twice in one --variant {origin}")
        sets.append(tuple(items))
    if len(set(sets)) != len(sets):
        problems.append("--variant: the same variant is given twice")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return sets


def parse_grid(sets: list[str]) -> tuple[list[str], list[Axis]]:
    """(fixed overrides, axes) of a sweep's `--set` options; RecipeError naming every bad one."""
    from metis_cli.recipe.load import parse_override

    fixed: list[str] = []
    axes: list[Axis] = []
    problems: list[str] = []
    seen: set[str] = set()
    for text in sets:
        field, sep, value_text = text.partition("=")
        field = field.strip()
        try:
            parse_override(text)  # the key's shape, as every --set checks it
        except RecipeError as error:
            problems += error.problems
            continue
        origin = f"(--set {text})"
        if field in seen:
            problems.append(f"{field}: given twice; put all its values in one --set {field}=a,b {origin}")
            continue
        seen.add(field)
        reserved = next((r for r in RESERVED_FIELDS if r == field or r.startswith(field + ".")), None)
        if reserved:
            problems.append(f"{field}: set by metis sweep itself, not by a grid: {RESERVED_FIELDS[reserved]} {origin}")
            continue
        values = split_values(value_text) if sep else []
        if not value_text.strip():
            problems.append(f"{field}: empty value list; give one value or several separated by commas, "
                            f"e.g. --set {field}=a,b {origin}")
            continue
        if "" in values:
            problems.append(f"{field}: empty value in the list {value_text!r} (two commas, or one at an end) {origin}")
            continue
        parsed = [_parsed(v) for v in values]
        twins = [(a, b) for (i, a), (j, b) in itertools.combinations(enumerate(values), 2) if parsed[i] == parsed[j]]
        if twins:
            a, b = twins[0]
            same = f"{a!r} twice" if a == b else f"{a!r} and {b!r}, the same value"
            problems.append(f"{field}: lists {same}; each value once {origin}")
            continue
        if len(values) == 1:
            fixed.append(f"{field}={values[0]}")
        else:
            axes.append(Axis(field, tuple(values)))
    if problems:
        raise RecipeError(problems)
    return fixed, axes


def expand(axes: list[Axis], variant_sets: list[tuple[str, ...]] | None = None) -> list[Variant]:
    """Each `--variant` set (or the recipe itself) crossed with the cartesian product of the axes
    (the first varies slowest)."""
    points = [(*base, *(f"{axis.field}={value}" for axis, value in zip(axes, combo)))
              for base in (variant_sets or [()])
              for combo in itertools.product(*(axis.values for axis in axes))]
    fields = list(dict.fromkeys(item.partition("=")[0] for point in points for item in point))
    leaves = [field.rsplit(".", 1)[-1] for field in fields]
    labels = {field: leaf if leaves.count(leaf) == 1 else field for field, leaf in zip(fields, leaves)}
    variants = []
    for point in points:
        pairs = [(labels[item.partition("=")[0]], item.partition("=")[2]) for item in point]
        name = " ".join(f"{label}={value}" for label, value in pairs) or "recipe"
        slug = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", f"{label}-{value}").strip("-") for label, value in pairs)
        slug = slug or "recipe"
        if len(slug) > _SLUG_MAX:
            slug = slug[:_SLUG_MAX - 9] + "-" + hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        variants.append(Variant(name, slug, point))
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):  # values that differ only in punctuation: number the folders
        variants = [Variant(v.name, f"{i:03d}-{v.slug}"[:_SLUG_MAX], v.overrides) for i, v in enumerate(variants)]
    return variants


def check_variants(recipe: str | Path, fixed: list[str], variants: list[Variant]):
    """Validate every variant's whole recipe; the first variant's `Recipe`, or a RecipeError
    listing each distinct problem once (each names its field, value and `--set`)."""
    from metis_cli.recipe.load import load_recipe

    problems: list[str] = []
    first = None
    for variant in variants:
        try:
            loaded = load_recipe(recipe, [*fixed, *variant.overrides])
        except RecipeError as error:
            problems += [p for p in error.problems if p not in problems]
            continue
        first = first or loaded
    if problems:
        raise RecipeError(problems)
    return first


def resolve_seeds(seeds: int | None, seed_list: str | None, default: int) -> list[int]:
    """--seeds N -> [0, ..., N-1]; --seed-list '0,5' -> [0, 5]; neither -> [the recipe's run.seed]."""
    if seeds is not None and seed_list is not None:
        raise RecipeError(["--seeds and --seed-list: give one of them"])
    if seeds is not None:
        if seeds < 1:
            raise RecipeError([f"--seeds: must be >= 1, got {seeds}"])
        return list(range(seeds))
    if seed_list is None:
        return [default]
    texts = split_values(seed_list)
    bad = [text for text in texts if not re.fullmatch(r"-?\d+", text)]
    if bad or not seed_list.strip():
        raise RecipeError([f"--seed-list: expected whole numbers separated by commas, e.g. 0,1,2, got {seed_list!r}"])
    values = [int(text) for text in texts]
    if len(set(values)) != len(values):
        raise RecipeError([f"--seed-list: each seed once, got {seed_list!r}"])
    return values


def _parsed(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
