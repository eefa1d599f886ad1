"""The JSON schema of the config file, for editors (`mirrord schema`, docs/mirrord.schema.json).

Owns: producing the schema from the model, including the shorthands (`"fs": "read"`, …) as
alternatives, and listing every key path it describes (the docs test uses that).
Does not own: validation (the model does it; the schema only helps editors complete and flag).
"""

from __future__ import annotations

from typing import Any

from mirrord.config._model import MirrordConfig

__all__ = ["config_schema", "schema_key_paths"]


def config_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a mirrord config file."""
    schema = MirrordConfig.model_json_schema(mode="validation")
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mirrord configuration",
    }
    out.update({k: v for k, v in schema.items() if k != "title"})
    # Editors write "$schema" into the file itself; allow it.
    out.setdefault("properties", {})["$schema"] = {"type": "string"}
    return out


def schema_key_paths(schema: dict[str, Any] | None = None) -> list[str]:
    """Every dotted key path the schema describes, e.g. `feature.network.incoming.mode`; keys of
    objects inside lists are written `...all_of[].header`."""
    schema = config_schema() if schema is None else schema
    defs: dict[str, Any] = schema.get("$defs", {})
    paths: list[str] = []

    def resolve(node: dict[str, Any]) -> list[dict[str, Any]]:
        if "$ref" in node:
            return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
        found = [node]
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                found.extend(resolve(sub))
        return found

    def items_of(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            v["items"]
            for v in resolve(node)
            if v.get("type") == "array" and isinstance(v.get("items"), dict)
        ]

    def walk(node: dict[str, Any], prefix: str, depth: int) -> None:
        if depth > 12:  # the model is a tree; this only guards against a cyclic schema
            return
        for variant in resolve(node):
            for key, sub in variant.get("properties", {}).items():
                if key == "$schema":
                    continue
                path = f"{prefix}.{key}" if prefix else key
                if path not in paths:
                    paths.append(path)
                walk(sub, path, depth + 1)
                for item in items_of(sub):
                    walk(item, f"{path}[]", depth + 1)

    walk(schema, "", 0)
    return paths
