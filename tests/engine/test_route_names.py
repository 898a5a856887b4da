"""engine.route_names: chain keys from generated Envoy route names (--route-name-pattern)."""

from __future__ import annotations

import re

import pytest

from engine import route_names
from engine.main import parse_args
from engine.route_names import RouteNamePattern

# The patterns docs/operators/gateways.md gives, on names in each product's scheme.
ENVOY_GATEWAY = route_names.ENVOY_GATEWAY_PATTERN
ENVOY_GATEWAY_PER_RULE = r"httproute/(?P<key>[^/]+/[^/]+/rule/\d+)/match/.+"
ISTIO = route_names.ISTIO_PATTERN


@pytest.mark.parametrize(
    ("pattern", "name", "key"),
    [
        pytest.param(
            ENVOY_GATEWAY,
            "httproute/shop/orders/rule/0/match/0/shop_example_com",
            "shop/orders",
            id="envoy-gateway-route",
        ),
        pytest.param(
            ENVOY_GATEWAY,
            "httproute/shop/orders/rule/3/match/1/*",
            "shop/orders",
            id="envoy-gateway-wildcard-host",
        ),
        pytest.param(
            ENVOY_GATEWAY,
            "httproute/shop/orders/rule/0/match/0",
            "shop/orders",
            id="envoy-gateway-no-hostname",
        ),
        pytest.param(
            ENVOY_GATEWAY_PER_RULE,
            "httproute/shop/orders/rule/2/match/0/shop_example_com",
            "shop/orders/rule/2",
            id="envoy-gateway-per-rule",
        ),
        pytest.param(ISTIO, "orders", "orders", id="istio-route"),
        pytest.param(ISTIO, "orders.by-prefix", "orders", id="istio-route-and-match"),
        pytest.param(ENVOY_GATEWAY, "hand-named", "hand-named", id="no-match-is-the-name"),
        pytest.param(
            ENVOY_GATEWAY,
            "xhttproute/shop/orders/rule/0/match/0",
            "xhttproute/shop/orders/rule/0/match/0",
            id="full-match-only",
        ),
        pytest.param(r"(a)|(?P<key>b)", "a", "a", id="key-group-unused-is-the-name"),
        pytest.param(r"p-(?P<key>.*)", "p-", "", id="empty-key"),
    ],
)
def test_key_from_route_name(pattern, name, key):
    assert RouteNamePattern(pattern).key(name) == key


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        pytest.param("httproute/(?P<key>[^/]+", "not a regular expression", id="bad-regex"),
        pytest.param("httproute/([^/]+)/.*", "named group (?P<key>...)", id="no-key-group"),
        pytest.param("(?P<name>.*)", "named group (?P<key>...)", id="other-group"),
    ],
)
def test_bad_patterns_are_refused(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RouteNamePattern(pattern)


def test_keys_are_cached_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(route_names, "CACHE_LIMIT", 2)
    pattern = RouteNamePattern(ISTIO)
    assert [pattern.key(n) for n in ("a.1", "b.1", "c.1", "a.1")] == ["a", "b", "c", "a"]
    assert pattern._cache == {"a.1": "a", "b.1": "b"}  # c.1 computed, not remembered


def test_the_flag_is_compiled_at_startup():
    args = parse_args(["--config", "x", "--route-name-pattern", ENVOY_GATEWAY])
    assert isinstance(args.route_name_pattern, RouteNamePattern)
    assert args.route_name_pattern.pattern == ENVOY_GATEWAY
    assert parse_args(["--config", "x"]).route_name_pattern is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        pytest.param("(?P<key>", "not a regular expression", id="bad-regex"),
        pytest.param("httproute/.*", "needs a named group (?P<key>...)", id="no-key-group"),
    ],
)
def test_a_bad_flag_exits_2_naming_the_flag(pattern, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", "x", "--route-name-pattern", pattern])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --route-name-pattern: {pattern!r}: " in err
    assert message in err
