"""YAML -> plain Python values that remember their line numbers, for errors that name the line.

Parsing uses PyYAML's SafeLoader composer (the same safe subset as ``yaml.safe_load``: no Python
tags, no object construction); scalars are resolved with SafeLoader's own constructor.
"""

from __future__ import annotations

import yaml

from ..errors import RecipeError


class LMap(dict):
    """A mapping with ``line`` (its own) and ``lines[key]`` (1-based line of each key)."""

    line: int = 0
    lines: dict


class LList(list):
    line: int = 0
    lines: list


_IN_PROGRESS = object()
_PLAIN_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _convert(node, loader, source: str, memo: dict | None = None):
    # aliases share composed nodes: convert each node once (a "billion laughs" recipe stays linear)
    # and refuse an alias to a collection that is still being converted (a cycle: infinite recursion)
    memo = {} if memo is None else memo
    if id(node) in memo:
        if memo[id(node)] is _IN_PROGRESS:
            raise RecipeError("malformed YAML: recursive alias", source, node.start_mark.line + 1)
        return memo[id(node)]
    memo[id(node)] = _IN_PROGRESS
    memo[id(node)] = out = _convert_node(node, loader, source, memo)
    return out


def _construct_scalar(node, loader, source: str):
    try:
        return loader.construct_object(node)
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`, `!!float x`
        raise RecipeError(f"malformed YAML: bad {node.tag.rsplit(':', 1)[-1]} value {node.value!r}: {e}",
                          source, node.start_mark.line + 1) from None


def _convert_node(node, loader, source: str, memo: dict):
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_COLLECTION_TAGS:
        # e.g. !!python/object/apply: never constructed, refused outright
        raise RecipeError(f"malformed YAML: tag {node.tag!r} is not allowed in recipes", source, line)
    if isinstance(node, yaml.MappingNode):
        out = LMap()
        out.line, out.lines = line, {}
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode):
                raise RecipeError("mapping keys must be plain strings", source, k_node.start_mark.line + 1)
            key = _construct_scalar(k_node, loader, source)
            if key in out:
                raise RecipeError(f"duplicate key {key!r}", source, k_node.start_mark.line + 1)
            out[key] = _convert(v_node, loader, source, memo)
            out.lines[key] = k_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LList(_convert(v, loader, source, memo) for v in node.value)
        out.line, out.lines = line, [v.start_mark.line + 1 for v in node.value]
        return out
    return _construct_scalar(node, loader, source)


def load_yaml_with_lines(text: str, source: str = "<recipe>"):
    try:
        loader = yaml.SafeLoader(text)  # raises ReaderError on control characters
    except yaml.YAMLError as e:
        raise RecipeError(f"malformed YAML: {e}".splitlines()[0], source) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("empty recipe", source, 1)
        return _convert(node, loader, source)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RecipeError(f"malformed YAML: {e.problem or e.context}", source, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"malformed YAML: {e}", source) from None
    except RecursionError:  # thousands of nested [ or {: PyYAML's composer recurses per level
        raise RecipeError("malformed YAML: nested too deeply", source) from None
    finally:
        loader.dispose()
