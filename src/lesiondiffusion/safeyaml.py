"""The one YAML loader for user files (catalogs, reports, the trainer's lesiondiffusion.yaml).

``yaml.safe_load`` builds no Python objects, but it is not bounded: ten levels of nine-way aliases in 1 KB
("billion laughs") expand to 9^10 nodes, and a self-referential alias (``&a [1, *a]``) builds a cyclic list
that every later walk turns into a RecursionError. Here the document is composed first, its aliases are
counted without expanding them (each node's expanded size is computed once), and a recursive or too large
document is refused, naming the file, before anything is constructed or walked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import LesionDiffusionError
from .io import read_text_input

# Catalogs, reports and configs are a few hundred nodes; 100k leaves room for any hand-written file while a
# bomb (millions to billions of nodes once expanded) is refused in microseconds.
MAX_EXPANDED_NODES = 100_000
MAX_ALIASES = 1_000


def _check_node(root: yaml.Node, where: str, error: type[LesionDiffusionError]) -> None:
    """Refuse a cycle or an expansion beyond MAX_EXPANDED_NODES, visiting each distinct node once."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: a deep document must not hit Python's recursion limit either
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_EXPANDED_NODES:
                raise error(f"{where}: the YAML expands to more than {MAX_EXPANDED_NODES} values through its "
                            f"aliases (*name) near line {node.start_mark.line + 1}; refusing to load it. Write "
                            "the values out instead of nesting aliases (a YAML 'billion laughs' file).")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise error(f"{where}:{node.start_mark.line + 1}: a YAML alias refers to the value that contains it "
                        "(a recursive structure such as &a [1, *a]); refusing to load it. Replace the alias with "
                        "the values it should hold.")
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise error(f"{where}:{child.start_mark.line + 1}: a YAML alias refers to the value that contains "
                            "it (a recursive structure such as &a [1, *a]); refusing to load it. Replace the "
                            "alias with the values it should hold.")
            if id(child) not in size:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return []


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that stops composing after MAX_ALIASES alias references."""

    def __init__(self, stream: str, where: str, error: type[LesionDiffusionError]) -> None:
        super().__init__(stream)
        self._aliases, self._where, self._error = 0, where, error

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise self._error(f"{self._where}:{mark.line + 1}: more than {MAX_ALIASES} YAML aliases (*name); "
                                  "refusing to load the file. Write the values out instead.")
        return super().compose_node(parent, index)


def compose_yaml(text: str, where: str | Path, error: type[LesionDiffusionError]) -> tuple[yaml.Node | None, Any]:
    """``(node, data)`` of one YAML document: the composed node (for line numbers) and the constructed
    value, after the alias checks. ``yaml.YAMLError`` propagates for the caller's syntax message."""
    where = str(where)
    loader = _CountingLoader(text, where, error)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is None:
        return None, None
    _check_node(node, where, error)
    # constructed from a second composition: merge keys (<<) are flattened into the nodes in place, and the
    # returned node must still show the file as written (duplicate-key and line checks)
    builder = yaml.SafeLoader(text)
    try:
        return node, builder.construct_document(builder.get_single_node())
    finally:
        builder.dispose()


def duplicate_keys(node: yaml.Node | None) -> list[tuple[str, int]]:
    """``(dotted key, line)`` of every key given twice in one mapping (YAML keeps the later silently). Each
    node is visited once, so aliases cost nothing."""
    found: list[tuple[str, int]] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node | None, str]] = [(node, "")]
    while stack:
        n, prefix = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: set[Any] = set()
            for k, v in n.value:
                name = f"{prefix}.{k.value}" if prefix else str(k.value)
                if k.value in keys:
                    found.append((name, k.start_mark.line + 1))
                keys.add(k.value)
                stack.append((v, name))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, f"{prefix}[{i}]") for i, v in enumerate(n.value))
    return sorted(found, key=lambda t: t[1])


def load_yaml(text: str, where: str | Path, error: type[LesionDiffusionError]) -> Any:
    """``yaml.safe_load`` bounded in time and memory (see the module docstring)."""
    return compose_yaml(text, where, error)[1]


def read_yaml(path: str | Path, what: str, error: type[LesionDiffusionError]) -> Any:
    """Read a small YAML file (size and encoding checked by ``io.read_text_input``) and load it bounded; a
    syntax error names the file, line and column."""
    text = read_text_input(path, what, error)
    try:
        return load_yaml(text, path, error)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, path, error) from None


def syntax_error(exc: yaml.YAMLError, path: str | Path, error: type[LesionDiffusionError]) -> LesionDiffusionError:
    """A YAML syntax error as ``error``, naming the file, line and column."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    return error(f"{where}: YAML syntax error: {problem}. Fix the YAML at that line.")
