"""Firecracker's API schema (``firecracker.yaml``, Swagger 2.0) loaded and turned into request checks.

Shared by the in-process API stand-in of ``tests/unit/test_firecracker_api.py`` and the stand-in
executable ``tests/standin/firecracker.py``. The schema is read where ``firecracker_spec.spec_dir()``
finds it (or where a caller says), never copied into the repository.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import yaml


class Yaml12Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 booleans (only true/false).

    PyYAML follows YAML 1.1, where a bare ``Off`` is the boolean false: read that way, the Logger's
    ``level`` enum would hold ``false`` instead of the string ``"Off"`` that Firecracker accepts.
    """


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_spec(path: str | Path) -> dict:
    """The parsed schema file (``firecracker.yaml``)."""
    with Path(path).open() as f:
        return yaml.load(f, Loader=Yaml12Loader)


def strict(definitions: dict) -> dict:
    """The definitions with unknown keys refused wherever the schema leaves ``additionalProperties`` unsaid.

    The schema permits any extra key in a body; requiring none here means a misspelt field fails a
    test instead of a boot on a KVM host.
    """
    definitions = copy.deepcopy(definitions)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(definitions)
    return definitions


_STRICT_CACHE: dict[int, tuple[dict, dict]] = {}  # id(spec) -> (spec, its strict definitions)
_VALIDATOR_CACHE: dict[tuple[int, str], jsonschema.Draft4Validator] = {}


def _strict_definitions(spec: dict) -> dict:
    cached = _STRICT_CACHE.get(id(spec))
    if cached is None or cached[0] is not spec:
        cached = (spec, strict(spec["definitions"]))
        _STRICT_CACHE[id(spec)] = cached
    return cached[1]


def validator(spec: dict, schema: dict) -> jsonschema.Draft4Validator:
    """A validator for one schema fragment (``{"$ref": "#/definitions/…"}`` or inline), refs resolved.

    Swagger 2.0 schemas are a subset of JSON Schema draft 4. Validators are cached per spec object and
    fragment, since the stand-in executable checks every request with one.
    """
    key = (id(spec), json.dumps(schema, sort_keys=True))
    found = _VALIDATOR_CACHE.get(key)
    if found is None:
        root = {"definitions": _strict_definitions(spec), **schema}
        jsonschema.Draft4Validator.check_schema(root)
        found = _VALIDATOR_CACHE[key] = jsonschema.Draft4Validator(root)
    return found


def definition(spec: dict, name: str) -> jsonschema.Draft4Validator:
    assert name in spec["definitions"], f"firecracker.yaml has no definition {name!r}"
    return validator(spec, {"$ref": f"#/definitions/{name}"})


def operation(spec: dict, method: str, path: str) -> tuple[str, dict] | None:
    """The schema's path template and operation for a request, or None when the schema has no such call."""
    for template, operations in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    return None


def path_params(template: str, path: str) -> dict[str, str]:
    """The ``{name}`` segments of ``template`` as they appear in ``path`` (still percent-encoded)."""
    names = re.findall(r"\{([^/]+?)\}", template)
    pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "([^/]+)", re.escape(template)) + "$"
    match = re.match(pattern, path)
    return dict(zip(names, match.groups(), strict=True)) if match else {}


def body_schema(op: dict) -> dict | None:
    params = [p for p in op.get("parameters", []) if p.get("in") == "body"]
    return params[0]["schema"] if params else None


def body_error(spec: dict, schema: dict, body) -> str | None:
    """Why ``body`` fails ``schema`` (the most relevant error, prefixed with where), or None when it is valid."""
    error = jsonschema.exceptions.best_match(validator(spec, schema).iter_errors(body))
    if error is None:
        return None
    return f"{'/'.join(map(str, error.absolute_path)) or 'body'}: {error.message}"
