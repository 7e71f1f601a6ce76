"""Check JSON payloads against the sglang 0.5.23 request schemas in fixtures/sglang_0_5_23.

Types: int, float (an int passes), str, bool (never an int, nor an int a bool), dict, any,
None, list[T], dict[str, T] and unions A | B. Optional field keys: ``choices`` (allowed values,
of each element for a list) and ``schema`` (dict values must also fit that class).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sglang_0_5_23"


@cache
def _load(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}


def schemas() -> dict[str, dict[str, dict[str, Any]]]:
    return _load("requests.json")  # class -> field -> {"type", "required", "default"?, ...}


def split_top(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    depth = start = 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_SCALARS = {
    "any": lambda v: True,
    "None": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
}


def check_type_string(type_str: str) -> None:
    """Raise ValueError unless every alternative of ``type_str`` is in the grammar."""
    for alt in split_top(type_str, "|"):
        if alt in _SCALARS:
            pass
        elif alt.startswith("list[") and alt.endswith("]"):
            check_type_string(alt[5:-1])
        elif alt.startswith("dict[") and alt.endswith("]"):
            key, value = split_top(alt[5:-1], ",")
            if key != "str":
                raise ValueError(f"dict keys must be str in {alt!r}")
            check_type_string(value)
        else:
            raise ValueError(f"unknown type {alt!r}")


def matches(value: Any, type_str: str) -> bool:
    """Whether a JSON value has the type ``type_str``."""
    for alt in split_top(type_str, "|"):
        if alt in _SCALARS:
            ok = _SCALARS[alt](value)
        elif alt.startswith("list["):
            ok = isinstance(value, list) and all(matches(v, alt[5:-1]) for v in value)
        elif alt.startswith("dict["):
            value_type = split_top(alt[5:-1], ",")[1]
            ok = isinstance(value, dict) and all(matches(v, value_type) for v in value.values())
        else:
            raise ValueError(f"unknown type {alt!r}")
        if ok:
            return True
    return False


def validate(payload: dict[str, Any], cls: str) -> None:
    """Assert that ``payload``, as sent on the wire (JSON), fits sglang 0.5.23's ``cls``."""
    schema = schemas().get(cls)
    assert schema is not None, f"no recorded sglang 0.5.23 schema for {cls!r}"
    try:
        wire = json.loads(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{cls}: payload is not strict JSON: {exc}") from exc
    assert isinstance(wire, dict), f"{cls}: payload must be a JSON object, got {type(payload)}"
    for key in wire:
        assert key in schema, f"{cls}: unknown key {key!r} (sglang 0.5.23 has {sorted(schema)})"
    for key, spec in schema.items():
        if key not in wire:
            assert not spec["required"], f"{cls}: missing required key {key!r}"
            continue
        value = wire[key]
        assert matches(value, spec["type"]), f"{cls}.{key}: {value!r:.80} is not {spec['type']}"
        items = value if isinstance(value, list) else [value]
        if "choices" in spec:
            bad = [v for v in items if v is not None and v not in spec["choices"]]
            assert not bad, f"{cls}.{key}: {bad} not in {spec['choices']}"
        if "schema" in spec:
            for item in items:
                if isinstance(item, dict):
                    validate(item, spec["schema"])


def validate_request(path: str, payload: dict[str, Any] | None) -> None:
    """Assert that ``payload`` is a valid body for the sglang endpoint ``path``."""
    endpoint = _load("endpoints.json").get(path)  # path -> {"method", "request", "notes"}
    assert endpoint is not None, f"endpoint {path!r} is not in the recorded sglang 0.5.23 table"
    if endpoint["request"] is None:
        assert not payload, f"{path} takes no JSON body, got {payload!r}"
    else:
        validate(payload if payload is not None else {}, endpoint["request"])
