"""YAML as people type it in an experiment file and in ``--set``: YAML 1.2's scalars, safe types only."""
from __future__ import annotations

import re
from typing import Any

import yaml


class Yaml12Loader(yaml.SafeLoader):
    """``safe_load`` with YAML 1.2's core schema for scalars: ``1e-3``, ``5e-4`` and ``.5`` are floats (YAML 1.1,
    PyYAML's default, reads the first two as strings), ``017`` is 17, and only true/false are booleans
    (``no``, ``off``, ``yes``, ``on`` stay strings; ``12:30`` is not a base-60 number). A key twice in one mapping is
    an error, as YAML 1.2 says, rather than PyYAML's silent "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in lines:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line {lines[key] + 1})", key_node.start_mark)
                lines[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base constructor names it
                continue
        return super().construct_mapping(node, deep)


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _yaml12_int(loader.construct_scalar(node)))


def _yaml12_int(text: str) -> int:
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 scalars (``Yaml12Loader``): what every config file and ``--set`` value goes through."""
    return yaml.load(text, Loader=Yaml12Loader)
