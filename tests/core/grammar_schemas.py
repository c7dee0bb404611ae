"""Ten JSON schemas for the constrained-decoding validity tests (tests/core/test_grammar.py, the server's).

Every string has a maxLength and every array a maxItems: on random weights nothing else would make the
model close a string, so an unbounded one could run to max_new_tokens and the output would be cut off
(a length finish, not a grammar failure). Numbers with bounds are bounded in digits by xgrammar itself.
"""

from __future__ import annotations

from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat-required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "optional-fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "nickname": {"type": "string", "maxLength": 6},
            "active": {"type": "boolean"},
        },
        "required": ["id"],
    },
    "enum-and-const": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3]},
            "kind": {"const": "shirt"},
        },
        "required": ["color", "size", "kind"],
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -40.5, "maximum": 50.25},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["temperature", "humidity", "ratio"],
    },
    "array-of-enums": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}},
        "required": ["tags"],
    },
    "nested-object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "first": {"type": "string", "maxLength": 5},
                    "address": {
                        "type": "object",
                        "properties": {
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            "country": {"enum": ["US", "FR", "JP"]},
                        },
                        "required": ["zip", "country"],
                    },
                },
                "required": ["first", "address"],
            }
        },
        "required": ["user"],
    },
    "array-of-objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "maxLength": 4}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    "defs-and-refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": -10, "maximum": 10}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "any-of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "string", "maxLength": 3}, {"type": "null"}]}
        },
        "required": ["value"],
    },
    "top-level-array": {
        "type": "array",
        "items": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        "minItems": 1,
        "maxItems": 3,
    },
}
