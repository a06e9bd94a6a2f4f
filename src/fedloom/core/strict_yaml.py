"""A strict YAML loader for files a person writes and another party must trust (the plan,
a site's policy): yaml's safe loader, refusing what hides meaning or costs memory.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NESTING = 16  # sections and lists inside one another, in the file or an override


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a plan may not use (see :class:`StrictLoader`)."""


class StrictLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key written twice in one mapping; anchors and
    aliases (a few hundred bytes of them expand to gigabytes, the "billion laughs");
    nesting deeper than :data:`MAX_NESTING`; and numbers longer than any setting."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAML(
                None,
                None,
                "anchors and aliases (&name, *name, <<: *name) are not accepted; "
                "write each value out",
                event.start_mark,
            )
        if self._depth >= MAX_NESTING:
            raise RefusedYAML(
                None,
                None,
                f"sections and lists are nested more than {MAX_NESTING} deep",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _bounded_int(loader: StrictLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > 40:  # more digits than any setting takes
        raise RefusedYAML(
            None,
            None,
            f"a number of {len(node.value)} characters is longer than any setting takes",
            node.start_mark,
        )
    return loader.construct_yaml_int(node)


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def where(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark
    return "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
