"""``policy_engine.v1.RouteChain`` resources <-> the engine's configuration document.

The proto (``proto/policy_engine/v1/route_chain.proto``) mirrors the YAML format of
:mod:`engine.config` field for field. Both directions live here so the engine (which
decodes) and the control plane (which encodes) can never disagree:

* :func:`decode_resources`: the ``Any`` resources of one DiscoveryResponse -> the
  configuration mapping ``{"routes": {key: {"policies": [...]}}}`` that
  :func:`engine.config.load_config` validates exactly as it validates a file. Problems
  of the envelope itself (wrong type URL, undecodable bytes, oversized or duplicate
  resources) are collected, one line each, naming the resource index and route key.
* :func:`encode_route`: one validated YAML route spec -> a ``RouteChain``.

Conversions worth knowing: ``google.protobuf.Struct`` numbers are doubles, so a whole
number (``5.0``) becomes the integer ``5`` (JSON-schema ``integer`` parameters and
policy code expect ints); ``Duration`` timeouts become ``"250ms"`` / ``"1.5s"`` strings;
unset wrapper/enum/zero fields are simply absent, so the YAML defaults apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message
from policy_engine.v1 import route_chain_pb2

from engine.definition import parse_duration

__all__ = [
    "MAX_RESOURCE_BYTES",
    "RESOURCE_WRAPPER_TYPE",
    "ROUTE_CHAIN_TYPE",
    "SETTINGS_NAME",
    "SETTINGS_TYPE",
    "decode_resources",
    "decode_settings",
    "encode_route",
    "encode_settings",
    "route_chain_to_spec",
]

ROUTE_CHAIN_TYPE: Final = "type.googleapis.com/policy_engine.v1.RouteChain"
"""The type URL of a route chain resource (DiscoveryRequest/Response and each Any)."""

SETTINGS_TYPE: Final = "type.googleapis.com/policy_engine.v1.EngineSettings"
"""The type URL of the (at most one) engine settings resource: top-level config fields."""

SETTINGS_NAME: Final = "settings"

RESOURCE_WRAPPER_TYPE: Final = "type.googleapis.com/envoy.service.discovery.v3.Resource"
"""xDS servers may wrap each resource in ``envoy.service.discovery.v3.Resource``."""

MAX_RESOURCE_BYTES: Final = 1 << 20
"""One route's chain larger than 1 MiB is refused: no sane chain is that big, and
decoding it would cost the event loop (and memory) for nothing."""

_MAX_SAFE_INTEGER: Final = 2**53  # doubles represent every integer up to here exactly
_ON_ERROR_NAMES: Final = {
    route_chain_pb2.FAIL_CLOSED: "failClosed",
    route_chain_pb2.FAIL_OPEN: "failOpen",
}
_ON_ERROR_VALUES: Final = {name: value for value, name in _ON_ERROR_NAMES.items()}
_MODE_NAMES: Final = {
    route_chain_pb2.ENFORCE: "enforce",
    route_chain_pb2.SHADOW: "shadow",
}
_MODE_VALUES: Final = {name: value for value, name in _MODE_NAMES.items()}


# ----------------------------------------------------------------------------- decode


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_SAFE_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind set


def _duration_text(duration: duration_pb2.Duration) -> str:
    nanos = duration.seconds * 1_000_000_000 + duration.nanos
    if nanos % 1_000_000 == 0:
        return f"{nanos // 1_000_000}ms"
    sign = "-" if nanos < 0 else ""
    whole, fraction = divmod(abs(nanos), 1_000_000_000)
    return f"{sign}{whole}.{fraction:09d}s"


def _entry_spec(entry: route_chain_pb2.PolicyEntry) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if entry.name:
        spec["name"] = entry.name
    if entry.version:
        spec["version"] = entry.version
    if entry.HasField("enabled"):
        spec["enabled"] = entry.enabled.value
    if entry.condition:
        spec["condition"] = entry.condition
    if entry.HasField("timeout"):
        spec["timeout"] = _duration_text(entry.timeout)
    if entry.on_error != route_chain_pb2.ON_ERROR_UNSPECIFIED:
        # An unknown enum number (proto3 keeps it) is passed on as is: the shared
        # validation then names it ("onError: 7 is not one of failOpen, failClosed").
        spec["onError"] = _ON_ERROR_NAMES.get(entry.on_error, entry.on_error)
    if entry.error_status:
        spec["errorStatus"] = entry.error_status
    if entry.mode != route_chain_pb2.MODE_UNSPECIFIED:
        # As onError: an unknown number is passed on for the shared validation to name.
        spec["mode"] = _MODE_NAMES.get(entry.mode, entry.mode)
    if entry.HasField("parameters"):
        spec["parameters"] = {k: _plain(v) for k, v in entry.parameters.fields.items()}
    return spec


def route_chain_to_spec(chain: route_chain_pb2.RouteChain) -> dict[str, Any]:
    """The YAML route spec (``{"policies": [...]}``) a ``RouteChain`` stands for."""
    spec: dict[str, Any] = {"policies": [_entry_spec(entry) for entry in chain.policies]}
    if chain.HasField("debug"):
        spec["debug"] = {"timing": chain.debug.timing}
    return spec


def _unwrap(index: int, resource: any_pb2.Any, errors: list[str]) -> any_pb2.Any | None:
    if resource.type_url == RESOURCE_WRAPPER_TYPE:
        from envoy.service.discovery.v3 import discovery_pb2  # noqa: PLC0415 - rare path

        wrapper = discovery_pb2.Resource()
        try:
            wrapper.ParseFromString(resource.value)
        except DecodeError as exc:
            errors.append(f"resources[{index}]: cannot decode the Resource wrapper: {exc}")
            return None
        unwrapped: any_pb2.Any = wrapper.resource
        return unwrapped
    return resource


def _parsed(
    index: int, raw: any_pb2.Any, type_url: str, message: Message, errors: list[str]
) -> bool:
    """Parse resource ``index`` into ``message`` if it has ``type_url`` and a sane size;
    else False and an error naming the resource."""
    resource = _unwrap(index, raw, errors)
    if resource is None:
        return False
    if resource.type_url != type_url:
        errors.append(f"resources[{index}]: type URL {resource.type_url!r} is not {type_url}")
        return False
    size = len(resource.value)
    if size > MAX_RESOURCE_BYTES:
        errors.append(
            f"resources[{index}]: {size} bytes, over the limit of {MAX_RESOURCE_BYTES} "
            "bytes per resource"
        )
        return False
    try:
        message.ParseFromString(resource.value)
    except DecodeError as exc:
        name = message.DESCRIPTOR.full_name
        errors.append(f"resources[{index}]: cannot decode as {name}: {exc}")
        return False
    return True


_ACTION_NAMES: Final = {
    route_chain_pb2.UnknownRoute.DENY: "deny",
    route_chain_pb2.UnknownRoute.ALLOW: "allow",
}


def decode_settings(resources: Sequence[any_pb2.Any]) -> tuple[dict[str, Any], list[str]]:
    """The top-level config fields (``{"unknownRoute": {...}}``) of an EngineSettings
    response, and its problems. No resource: ``{}`` (every default)."""
    errors: list[str] = []
    if len(resources) > 1:
        return {}, [f"{len(resources)} EngineSettings resources; at most one is allowed"]
    fields: dict[str, Any] = {}
    for index, raw in enumerate(resources):
        settings = route_chain_pb2.EngineSettings()
        if not _parsed(index, raw, SETTINGS_TYPE, settings, errors):
            continue
        if settings.HasField("unknown_route"):
            unknown = settings.unknown_route
            spec: dict[str, Any] = {}
            if unknown.action != route_chain_pb2.UnknownRoute.ACTION_UNSPECIFIED:
                spec["action"] = _ACTION_NAMES.get(unknown.action, unknown.action)
            if unknown.status:
                spec["status"] = unknown.status
            fields["unknownRoute"] = spec
    return fields, errors


def encode_settings(document: Mapping[str, Any]) -> route_chain_pb2.EngineSettings | None:
    """The EngineSettings of an already valid config document; None if it sets nothing."""
    unknown = document.get("unknownRoute")
    if unknown is None:
        return None
    settings = route_chain_pb2.EngineSettings()
    values = {name: value for value, name in _ACTION_NAMES.items()}
    settings.unknown_route.action = values[unknown.get("action", "deny")]
    if "status" in unknown:
        settings.unknown_route.status = unknown["status"]
    return settings


def decode_resources(resources: Sequence[any_pb2.Any]) -> tuple[dict[str, Any], list[str]]:
    """The configuration document for one state-of-the-world response, and its problems.

    Returns ``(document, errors)``; ``errors`` empty means every resource decoded (the
    document still has to pass :func:`engine.config.load_config`). A resource that
    fails here is left out of the document, so the caller must reject the whole update
    when ``errors`` is not empty.
    """
    errors: list[str] = []
    routes: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for index, raw in enumerate(resources):
        chain = route_chain_pb2.RouteChain()
        if not _parsed(index, raw, ROUTE_CHAIN_TYPE, chain, errors):
            continue
        if not chain.key:
            errors.append(f"resources[{index}]: key: must be a non-empty route key")
            continue
        if chain.key in seen:
            errors.append(
                f"resources[{index}]: route key {chain.key!r} appears twice "
                f"(also resources[{seen[chain.key]}])"
            )
            continue
        seen[chain.key] = index
        routes[chain.key] = route_chain_to_spec(chain)
    return {"routes": routes}, errors


# ----------------------------------------------------------------------------- encode


def _duration(text: str) -> duration_pb2.Duration:
    nanos = round(parse_duration(text) * 1_000_000_000)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def encode_route(key: str, spec: Mapping[str, Any]) -> route_chain_pb2.RouteChain:
    """The ``RouteChain`` of route ``key`` whose YAML spec is ``spec``.

    ``spec`` must already be valid (:func:`engine.config.load_config` accepted it):
    this is a conversion, not a validation, and raises ``ValueError`` or ``TypeError``
    on input the YAML format would reject anyway.
    """
    chain = route_chain_pb2.RouteChain(key=key)
    debug = spec.get("debug")
    if debug is not None:
        chain.debug.SetInParent()
        chain.debug.timing = bool(debug.get("timing", False))
    for raw in spec.get("policies") or ():
        entry = chain.policies.add(name=raw["name"], version=raw["version"])
        if "enabled" in raw:
            entry.enabled.value = bool(raw["enabled"])
        if raw.get("condition") is not None:
            entry.condition = raw["condition"]
        if raw.get("timeout") is not None:
            entry.timeout.CopyFrom(_duration(raw["timeout"]))
        if "onError" in raw:
            entry.on_error = _ON_ERROR_VALUES[raw["onError"]]
        if "errorStatus" in raw:
            entry.error_status = raw["errorStatus"]
        if "mode" in raw:
            entry.mode = _MODE_VALUES[raw["mode"]]
        if raw.get("parameters") is not None:
            entry.parameters.update(raw["parameters"])
    return chain
