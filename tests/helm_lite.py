"""A poor man's `helm template` for the chart tests: no helm binary is available here.

It decides the `if` / `else` / `with` / `range` actions that stand on lines of their own from the
values, and fills in `{{ .Values.a.b }}`; every other action (include, toYaml, required, inline
ifs) is left as it is, which is enough to check the lines that matter (args, ports). An action it
does not understand is an error, so a template change cannot make a test silently check nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

# A control action alone on its line, e.g. `{{- if and .Values.a .Values.b }}`.
CONTROL = re.compile(r"\s*\{\{-?\s*(if|else|end|with|range)\b(.*?)\s*-?\}\}\s*")
VALUE = re.compile(r"\{\{-? \.Values\.([\w.]+) -?\}\}")
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "not": lambda x: not x,
    "and": lambda *xs: all(xs),
    "or": lambda *xs: any(xs),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
}


def lookup(values: dict[str, Any], path: str) -> Any:
    """`.Values.<path>`; None where a key is missing, as helm gives nil."""
    node: Any = values
    for key in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def with_values(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `values` with dotted paths set, like `helm --set a.b=c`."""
    result = copy.deepcopy(values)
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = result
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return result


def evaluate(expression: str, values: dict[str, Any]) -> Any:
    """A pipeline of .Values paths, string literals, parentheses and not/and/or/eq/ne."""
    tokens = re.findall(r'\(|\)|"[^"]*"|[^\s()]+', expression)
    result = _call(tokens, values)
    if tokens:
        raise ValueError(f"template expression not understood: {expression!r}")
    return result


def _call(tokens: list[str], values: dict[str, Any]) -> Any:
    if tokens and tokens[0] in FUNCTIONS:
        function = FUNCTIONS[tokens.pop(0)]
        args = []
        while tokens and tokens[0] != ")":
            args.append(_operand(tokens, values))
        return function(*args)
    return _operand(tokens, values)


def _operand(tokens: list[str], values: dict[str, Any]) -> Any:
    token = tokens.pop(0) if tokens else ""
    if token == "(":
        result = _call(tokens, values)
        if not tokens or tokens.pop(0) != ")":
            raise ValueError("unbalanced parentheses in a template expression")
        return result
    if token.startswith('"'):
        return token[1:-1]
    if token.startswith(".Values."):
        return lookup(values, token.removeprefix(".Values."))
    raise ValueError(f"template operand not understood: {token!r}")


def _fill(line: str, values: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        found = lookup(values, match.group(1))
        return str(found).lower() if isinstance(found, bool) else str(found)

    return VALUE.sub(value, line)


def render(text: str, values: dict[str, Any]) -> list[str]:
    """The lines of a template that `values` select, with `.Values` filled in.

    A `range` or `with` body is kept once when its value is non-empty (its `{{ . }}` is left as is).
    A selected `fail` is raised: helm would refuse these values.
    """
    lines: list[str] = []
    # One entry per open block: (the enclosing block is selected, this branch is taken).
    stack: list[tuple[bool, bool]] = []
    for line in text.splitlines():
        selected = all(taken for _, taken in stack)
        control = CONTROL.fullmatch(line)
        if control is None:
            if selected:
                if re.search(r"\{\{-?\s*fail\b", line):
                    raise ValueError(f"helm would fail: {line.strip()}")
                lines.append(_fill(line, values))
            continue
        word, expression = control.groups()
        if word == "end":
            stack.pop()
        elif word == "else":
            if expression:
                raise ValueError(f"`else {expression}` is not supported here")
            outer, taken = stack.pop()
            stack.append((outer, outer and not taken))
        else:
            stack.append((selected, selected and bool(evaluate(expression, values))))
    if stack:
        raise ValueError("unclosed template block")
    return lines
