"""The recorded sglang 0.5.23 request schemas and their validator (tests/sglang_schema.py).

The last tests compare the fixtures with sglang's own classes; they run only where sglang
imports (its own GPU environment) and are skipped with the reason printed elsewhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from typing import Any

import pytest
from sglang_schema import (
    FIXTURES,
    check_type_string,
    matches,
    schemas,
    split_top,
    validate,
    validate_request,
)

SGLANG_VERSION = "0.5.23"


def _generate_payload() -> dict[str, Any]:
    return {
        "input_ids": [1, 2, 3],
        "sampling_params": {
            "temperature": 1,
            "top_p": 0.9,
            "top_k": -1,
            "max_new_tokens": 16,
            "stop_token_ids": [2],
            "sampling_seed": 7,
            "n": 4,
        },
        "return_logprob": True,
        "rid": "req-0",
    }


def _bucket_payload() -> dict[str, Any]:
    return {
        "names": ["model.embed_tokens.weight", "model.norm.weight"],
        "dtypes": ["bfloat16", "bfloat16"],
        "shapes": [[300, 64], [64]],
        "group_name": "sfpo_pp0",
        "load_format": "flattened_bucket",
        "flush_cache": False,
        "weight_version": "3",
    }


# --- the fixtures themselves ---------------------------------------------------------------


def test_fixtures_are_well_formed():
    raw = json.loads((FIXTURES / "requests.json").read_text())
    assert raw["_source"]["version"] == SGLANG_VERSION
    for cls, fields in schemas().items():
        for name, spec in fields.items():
            where = f"{cls}.{name}"
            assert set(spec) <= {"type", "required", "default", "choices", "schema"}, where
            check_type_string(spec["type"])
            if spec["required"]:
                assert "default" not in spec, where
            elif "default" in spec:
                assert matches(spec["default"], spec["type"]), where
            if "schema" in spec:
                assert spec["schema"] in schemas(), where
    endpoints = json.loads((FIXTURES / "endpoints.json").read_text())
    assert endpoints.pop("_source")["version"] == SGLANG_VERSION
    for path, endpoint in endpoints.items():
        assert endpoint["method"] in ("GET", "POST"), path
        assert endpoint["request"] is None or endpoint["request"] in schemas(), path
        assert endpoint["notes"], path


def test_type_grammar():
    assert split_top("list[int | None] | dict[str, list[int]] | None", "|") == [
        "list[int | None]",
        "dict[str, list[int]]",
        "None",
    ]
    assert matches(3, "float") and matches(3.5, "float") and not matches(True, "float")
    assert matches(True, "bool") and not matches(1, "bool") and not matches(True, "int")
    assert matches([[1, 2], [3]], "list[int] | list[list[int]]")
    assert not matches([1, [2]], "list[int] | list[list[int]]")
    assert matches({"a": 1.0, "b": 2}, "dict[str, float]") and not matches(
        {"a": "x"}, "dict[str, float]"
    )
    assert matches(None, "any") and matches(None, "str | None") and not matches(None, "str")
    for bad in ("integer", "list[int", "tuple[int]", "dict[int, str]"):
        with pytest.raises(ValueError):
            check_type_string(bad)


# --- the validator on good and bad payloads ------------------------------------------------


def test_good_payloads_pass():
    validate(_generate_payload(), "GenerateReqInput")
    validate(_bucket_payload(), "UpdateWeightsFromDistributedReqInput")
    init = {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1, "world_size": 3}
    validate(
        {**init, "group_name": "sfpo_pp0", "backend": "nccl"}, "InitWeightsUpdateGroupReqInput"
    )
    ipc = {"serialized_named_tensors": ["QUJD", "REVG"], "load_format": "flattened_bucket"}
    validate(
        {**ipc, "flush_cache": False, "weight_version": "3"}, "UpdateWeightsFromTensorReqInput"
    )
    validate({"tags": ["weights"]}, "ResumeMemoryOccupationReqInput")
    validate({"mode": "retract"}, "PauseGenerationReqInput")
    validate({}, "EndWeightUpdateReqInput")
    validate_request("/begin_weight_update", {})
    validate_request("/flush_cache", None)
    validate_request("/model_info", None)


def test_shapes_as_tuples_are_checked_as_the_json_lists_they_become():
    payload = _bucket_payload()
    payload["shapes"] = [(300, 64), (64,)]
    validate(payload, "UpdateWeightsFromDistributedReqInput")


def test_unknown_key_is_named():
    with pytest.raises(AssertionError, match="unknown key 'prompt_ids'"):
        validate({**_generate_payload(), "prompt_ids": [1]}, "GenerateReqInput")


def test_unknown_sampling_param_is_named():
    payload = _generate_payload()
    payload["sampling_params"]["seed"] = 1  # sglang calls it sampling_seed
    with pytest.raises(AssertionError, match="SamplingParams: unknown key 'seed'"):
        validate(payload, "GenerateReqInput")
    payload["sampling_params"] = [{"temperature": 1.0}, {"max_tokens": 3}]
    with pytest.raises(AssertionError, match="unknown key 'max_tokens'"):
        validate(payload, "GenerateReqInput")


def test_missing_required_key_is_named():
    payload = _bucket_payload()
    del payload["shapes"]
    with pytest.raises(AssertionError, match="missing required key 'shapes'"):
        validate(payload, "UpdateWeightsFromDistributedReqInput")
    with pytest.raises(AssertionError, match="missing required key 'master_address'"):
        validate(
            {"master_port": 1, "rank_offset": 1, "world_size": 2}, "InitWeightsUpdateGroupReqInput"
        )


@pytest.mark.parametrize(
    "cls, key, value",
    [
        ("InitWeightsUpdateGroupReqInput", "master_port", "29600"),
        ("InitWeightsUpdateGroupReqInput", "world_size", True),
        ("InitWeightsUpdateGroupReqInput", "rank_offset", 1.0),
        ("UpdateWeightsFromDistributedReqInput", "flush_cache", 0),
        ("UpdateWeightsFromDistributedReqInput", "shapes", [[300, 64.0], [64]]),
        ("UpdateWeightsFromDistributedReqInput", "weight_version", 3),
        ("GenerateReqInput", "input_ids", [1, "2"]),
        ("GenerateReqInput", "return_logprob", 1),
    ],
)
def test_wrong_type_is_named(cls, key, value):
    init = {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2}
    base = {
        "InitWeightsUpdateGroupReqInput": init,
        "UpdateWeightsFromDistributedReqInput": _bucket_payload(),
        "GenerateReqInput": _generate_payload(),
    }[cls]
    validate(base, cls)
    with pytest.raises(AssertionError, match=f"{cls}.{key}: "):
        validate({**base, key: value}, cls)


def test_none_only_where_optional():
    validate(
        {**_bucket_payload(), "weight_version": None, "load_format": None},
        "UpdateWeightsFromDistributedReqInput",
    )
    validate(
        {"input_ids": [1], "sampling_params": {"stop": None, "max_new_tokens": None}},
        "GenerateReqInput",
    )
    with pytest.raises(AssertionError, match=r"SamplingParams\.temperature"):
        validate({"input_ids": [1], "sampling_params": {"temperature": None}}, "GenerateReqInput")
    with pytest.raises(AssertionError, match=r"\.group_name"):
        validate({**_bucket_payload(), "group_name": None}, "UpdateWeightsFromDistributedReqInput")


def test_choices_and_strict_json():
    with pytest.raises(AssertionError, match="mode"):
        validate({"mode": "pause"}, "PauseGenerationReqInput")
    with pytest.raises(AssertionError, match="tags"):
        validate({"tags": ["weights", "kv"]}, "ReleaseMemoryOccupationReqInput")
    with pytest.raises(AssertionError, match="not strict JSON"):
        validate(
            {"input_ids": [1], "sampling_params": {"temperature": float("nan")}}, "GenerateReqInput"
        )
    with pytest.raises(AssertionError, match="not strict JSON"):
        validate({"input_ids": [1], "rid": object()}, "GenerateReqInput")
    with pytest.raises(AssertionError, match="no recorded"):
        validate({}, "NoSuchReqInput")
    with pytest.raises(AssertionError, match="takes no JSON body"):
        validate_request("/flush_cache", {"timeout": 1})
    with pytest.raises(AssertionError, match="not in the recorded"):
        validate_request("/update_weights", {})


# --- the fixtures against sglang's own classes (where sglang imports) ----------------------


def _import_sglang() -> tuple[Any, Any, Any]:
    try:
        import sglang
        from sglang.srt.managers import io_struct
        from sglang.srt.sampling import sampling_params
    except Exception as exc:  # any import failure means: not the sglang environment
        reason = f"sglang not importable here: {exc!r}"
        print(reason)
        pytest.skip(reason)
    return sglang, io_struct, sampling_params


_NO_DEFAULT = object()


def _sglang_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """Field name -> (resolved annotation, default or _NO_DEFAULT) of a dataclass, msgspec
    Struct (most io_struct classes and SamplingParams in 0.5.23) or plain class."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default
            if default is dataclasses.MISSING:
                factory = f.default_factory
                default = _NO_DEFAULT if factory is dataclasses.MISSING else factory()
            out[f.name] = (hints[f.name], default)
        return out
    import msgspec

    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        out = {}
        for f in msgspec.structs.fields(cls):
            default = f.default
            if f.required:
                default = _NO_DEFAULT
            elif default is msgspec.NODEFAULT:
                default = f.default_factory()
            out[f.name] = (f.type, default)
        return out
    hints = typing.get_type_hints(cls.__init__)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {
        p.name: (hints.get(p.name, Any), _NO_DEFAULT if p.default is p.empty else p.default)
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _alternatives(tp: Any) -> set[str]:
    """An annotation as the set of JSON type alternatives of the fixture grammar; dict
    parameters are dropped (both sides compare as plain 'dict')."""
    import msgspec

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _alternatives(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_alternatives(a) for a in args))
    if origin is typing.Literal:
        return {{bool: "bool", int: "int", str: "str"}[type(a)] for a in args}
    if origin in (list, set, frozenset, tuple) or tp in (list, set):
        inner = " | ".join(sorted(set().union(*(_alternatives(a) for a in args)) or {"any"}))
        return {f"list[{inner}]"}
    if origin is dict or tp is dict:
        return {"dict"}
    if tp is Any:
        return {"any"}
    if tp is type(None) or tp is None:
        return {"None"}
    simple = {bool: "bool", int: "int", float: "float", str: "str", bytes: "str"}
    if tp in simple:
        return {simple[tp]}
    if isinstance(tp, type) and (issubclass(tp, msgspec.Struct) or dataclasses.is_dataclass(tp)):
        return {"dict"}
    return {"any"}


def _recorded_alternatives(type_str: str) -> set[str]:
    out = set()
    for alt in split_top(type_str, "|"):
        if alt.startswith("list["):
            out.add(f"list[{' | '.join(sorted(_recorded_alternatives(alt[5:-1])))}]")
        else:
            out.add("dict" if alt.startswith("dict[") else alt)
    return out


def _literal_values(tp: Any) -> list[Any] | None:
    """The values of a Literal annotation (also under Optional, Union and list), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _literal_values(args[0])
    if origin is typing.Literal:
        return list(args)
    if origin not in (typing.Union, types.UnionType, list):
        return None
    values: list[Any] = []
    for arg in args:
        if arg is type(None):
            continue
        sub = _literal_values(arg)
        if sub is None:
            return None
        values += [v for v in sub if v not in values]
    return values or None


def test_sglang_version():
    sglang, _, _ = _import_sglang()
    assert sglang.__version__ == SGLANG_VERSION


def test_fixtures_match_sglang_classes():
    _, io_struct, sampling_params = _import_sglang()
    internal_sampling_fields = set(
        "stop_strs stop_regex_strs stop_str_max_len stop_regex_max_len is_normalized"
        " ebnf_full_assistant".split()
    )
    problems = []
    for cls_name, recorded in schemas().items():
        module = sampling_params if cls_name == "SamplingParams" else io_struct
        cls = getattr(module, cls_name, None)
        if cls is None:
            problems.append(f"{cls_name}: not in sglang")
            continue
        actual = _sglang_fields(cls)
        if cls_name == "SamplingParams":
            actual = {k: v for k, v in actual.items() if k not in internal_sampling_fields}
        if set(actual) != set(recorded):
            problems.append(
                f"{cls_name}: only sglang {sorted(set(actual) - set(recorded))}, "
                f"only recorded {sorted(set(recorded) - set(actual))}"
            )
        for name in set(actual) & set(recorded):
            tp, default = actual[name]
            spec = recorded[name]
            if spec["required"] != (default is _NO_DEFAULT):
                problems.append(f"{cls_name}.{name}: required is {default is _NO_DEFAULT}")
            if "default" in spec and default is not _NO_DEFAULT and spec["default"] != default:
                problems.append(f"{cls_name}.{name}: default {default!r}")
            if spec["type"] != "any" and _alternatives(tp) != _recorded_alternatives(spec["type"]):
                problems.append(
                    f"{cls_name}.{name}: sglang type {tp} ~ {sorted(_alternatives(tp))}"
                )
            if (values := _literal_values(tp)) is not None and spec.get("choices") != values:
                problems.append(f"{cls_name}.{name}: choices {values}")
    assert not problems, "\n".join(problems)


def test_recorded_sampling_params_pass_the_generate_contract_gate():
    _import_sglang()
    try:
        from sglang.api.v1 import api_types
    except Exception as exc:
        pytest.skip(f"sglang.api.v1 not importable: {exc!r}")
    accepted = set(api_types.SamplingParams.__struct_fields__)
    assert set(schemas()["SamplingParams"]) <= accepted
    with pytest.raises(api_types.JsonContractError, match="unknown field `seed`"):
        api_types.GenerateRequest.from_json_value(
            {"input_ids": [1], "sampling_params": {"seed": 1}}
        )


def test_good_payloads_build_sglang_requests():
    _, io_struct, sampling_params = _import_sglang()
    generate = _generate_payload()
    io_struct.GenerateReqInput(**generate)
    sampling_params.SamplingParams(**generate["sampling_params"])
    io_struct.UpdateWeightsFromDistributedReqInput(**_bucket_payload())
    init = {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2}
    io_struct.InitWeightsUpdateGroupReqInput(**init)
    io_struct.PauseGenerationReqInput(mode="retract")
    io_struct.EndWeightUpdateReqInput()
    with pytest.raises(TypeError, match="seed"):
        sampling_params.SamplingParams(seed=1)
