"""Config fuzz (issue 8, "what it must show"): hundreds of generated invalid configs.

Every document is invalid by construction: wrong types, missing fields, unknown
policies, versions and fields, huge or non-finite numbers, bad durations, bad CEL and bad
regular expressions, non-UTF-8 bytes, deep nesting, alias bombs, unsupported tags and
garbage. For each one:

* ``--validate`` (in-process ``main()`` for all of them, the real CLI as a subprocess for
  a sample of each kind, bounded by a timeout) exits 1 with at least one message line
  naming the file, and never prints a traceback;
* the same bytes written over a served config file and polled by
  :class:`~engine.store.FileConfigSource` leave the serving snapshot untouched.

The generator is seeded, so a failure names a reproducible document (its kind and index).
"""

from __future__ import annotations

import copy
import io
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.chain import Snapshot
from engine.main import main
from engine.registry import PolicyRegistry
from engine.store import ConfigStore, FileConfigSource
from tests.support import registry_from

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("addHeader", "sleeper", "statusSetter", "deny")
SEED = 8  # the number: change it to explore, keep it fixed in CI

BASE: dict[str, Any] = {
    "routes": {
        "public": {
            "policies": [
                {
                    "name": "addHeader",
                    "version": "v1.0.0",
                    "condition": 'request.path.startsWith("/api/")',
                    "timeout": "250ms",
                    "onError": "failClosed",
                    "errorStatus": 503,
                    "parameters": {"header": "x-a", "value": "1"},
                },
                {"name": "sleeper", "version": "v1.0.0", "parameters": {"seconds": 0.01}},
            ]
        },
        "private": {"policies": [{"name": "deny", "version": "v1.0.0"}]},
        "respond": {
            "policies": [
                {"name": "statusSetter", "version": "v1.0.0", "parameters": {"status": 201}}
            ]
        },
    },
    "unknownRoute": {"action": "deny", "status": 404},
}


def dump(document: Any) -> bytes:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode()


@dataclass(frozen=True)
class Case:
    kind: str
    index: int
    data: bytes

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.index}"


def entry_paths(doc: dict[str, Any]) -> list[tuple[str, int]]:
    return [(r, i) for r, spec in doc["routes"].items() for i in range(len(spec["policies"]))]


def set_entry(rng: random.Random, field: str, value: Any) -> bytes:
    doc = copy.deepcopy(BASE)
    route, index = rng.choice(entry_paths(doc))
    doc["routes"][route]["policies"][index][field] = value
    return dump(doc)


def wrong_types(rng: random.Random) -> Iterator[bytes]:
    not_str = [1, 2.5, True, [], ["x"], {"a": 1}]
    not_bool = ["yes", 1, 0.0, [], {"a": 1}]
    not_status = ["500", 600, 399, True, 500.5, [], None]
    for value in not_str:
        yield set_entry(rng, "name", value)
        yield set_entry(rng, "version", value)
    for value in not_bool:
        yield set_entry(rng, "enabled", value)
    for value in not_status:
        if value is not None:
            yield set_entry(rng, "errorStatus", value)
    for value in (1, [], {"a": 1}, "sometimes", ""):
        yield set_entry(rng, "onError", value)
    for value in (5, [], "soon", "-1s", "1.5.5s", "0ms", "1 s", "9" * 400 + "s"):
        yield set_entry(rng, "timeout", value)
    for value in (5, [], {"a": 1}, "", "   "):
        yield set_entry(rng, "condition", value)
    for value in ([], "x", 3, [{"header": "x-a"}]):
        yield set_entry(rng, "parameters", value)
    for where, value in (
        ("routes", []),
        ("routes", "public"),
        ("routes", 7),
        ("routes", None),
    ):
        doc = copy.deepcopy(BASE)
        doc[where] = value
        yield dump(doc)
    for value in ([], "x", 3, None, {"polices": []}):
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"] = value
        yield dump(doc)
    for value in ({}, "x", 3, None, [[]], ["addHeader"], [None]):
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"]["policies"] = value
        yield dump(doc)
    for value in (
        "deny",
        404,
        [],
        {"action": "pass"},
        {"status": 200},
        {"action": "allow", "status": 404},
    ):
        doc = copy.deepcopy(BASE)
        doc["unknownRoute"] = value
        yield dump(doc)
    for params in (
        {"header": 5, "value": "1"},
        {"header": "X-Upper", "value": "1"},
        {"header": "x-a", "value": ["1"]},
        {"header": "x-a", "value": "1", "append": "yes"},
        {"header": "x-a", "value": "1", "metadataKey": ""},
    ):
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"]["policies"][0]["parameters"] = params
        yield dump(doc)
    seconds: Any
    for seconds in ("1s", -1, [], {"s": 1}, True):
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"]["policies"][1]["parameters"] = {"seconds": seconds}
        yield dump(doc)
    for status in (199, 600, "201", 201.5, None, [201]):
        doc = copy.deepcopy(BASE)
        doc["routes"]["respond"]["policies"][0]["parameters"] = {"status": status}
        yield dump(doc)


def missing_fields(rng: random.Random) -> Iterator[bytes]:
    yield b"{}\n"
    yield b"routes:\n"
    yield b""
    yield b"# nothing but a comment\n"
    yield dump({"unknownRoute": {"action": "deny"}})
    for field in ("name", "version"):
        for _ in range(3):
            doc = copy.deepcopy(BASE)
            route, index = rng.choice(entry_paths(doc))
            del doc["routes"][route]["policies"][index][field]
            yield dump(doc)
    for required in ("header", "value"):
        doc = copy.deepcopy(BASE)
        del doc["routes"]["public"]["policies"][0]["parameters"][required]
        yield dump(doc)
    doc = copy.deepcopy(BASE)
    del doc["routes"]["respond"]["policies"][0]["parameters"]
    yield dump(doc)
    doc = copy.deepcopy(BASE)
    del doc["routes"]["private"]["policies"]
    yield dump(doc)


def unknown_names(rng: random.Random) -> Iterator[bytes]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(12):
        name = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
        yield set_entry(rng, "name", name + "Policy")
    for version in ("v9.9.9", "v1.0", "1.0.0", "", "v1.0.0-rc1", "V1.0.0", "v01.0.0", "latest"):
        yield set_entry(rng, "version", version)
    for where in ("top", "route", "entry", "parameters"):
        for _ in range(3):
            key = "".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) + "X"
            doc = copy.deepcopy(BASE)
            if where == "top":
                doc[key] = 1
            elif where == "route":
                doc["routes"]["public"][key] = []
            elif where == "entry":
                doc["routes"]["public"]["policies"][0][key] = True
            else:
                doc["routes"]["public"]["policies"][0]["parameters"][key] = "v"
            yield dump(doc)


def huge_numbers(rng: random.Random) -> Iterator[bytes]:
    template = dump(BASE).decode()
    for _ in range(10):
        digits = rng.choice([19, 20, 40, 300, 1000, 4000, 4300, 4301, 5000, 20000])
        yield template.replace("seconds: 0.01", f"seconds: {'9' * digits}").encode()
    for text in (".nan", ".NaN", ".inf", "-.inf", "1.0e400", "-1.0e999", "!!float nan"):
        yield template.replace("seconds: 0.01", f"seconds: {text}").encode()
    for text in ("9" * 20, "2" * 4000, ".nan", "1.0e400", "-" + "9" * 30):
        yield template.replace("status: 201", f"status: {text}").encode()
        yield template.replace("errorStatus: 503", f"errorStatus: {text}").encode()


def bad_expressions(rng: random.Random) -> Iterator[bytes]:
    conditions = [
        'request.path.matches("(")',
        'request.path.matches("[")',
        'request.path.matches("x**")',
        'request.path.matches("a{1001}")',
        'request.path.matches("^/(?=api)")',
        'matches(request.method, "[z-a]")',
        'true || request.Path.matches("(?<name")',
        'request.Pathh.startsWith("/api/")',
        "request.path > 5",
        "response.status == 200",
        'request.path.startsWith("/api/"',
        "1 + 2",
        "request.path",
        "requets.path == '/'",
        "metadata.",
        "&&",
        "@#$%",
        "'" * 3,
        "size(request.headers) ==",
        "x" * 5000 + " ==",
    ]
    for condition in conditions:
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"]["policies"][0]["condition"] = condition
        yield dump(doc)
    for pattern_value in ("X-Upper", "x a", "x\na", ""):
        doc = copy.deepcopy(BASE)
        doc["routes"]["public"]["policies"][0]["parameters"]["header"] = pattern_value
        yield dump(doc)


def non_utf8(rng: random.Random) -> Iterator[bytes]:
    valid = dump(BASE)
    for _ in range(20):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data.insert(rng.randrange(len(data)), rng.randint(0x80, 0xFF))
        # a lone continuation byte (0x80-0xbf) or a lead byte without its continuation
        data.insert(rng.randrange(len(data)), rng.choice([0x80, 0xBF, 0xC3, 0xE2, 0xFF]))
        yield bytes(data)
    yield b"\xff\xfe" + "routes: {}\n".encode("utf-16-le")[2:]
    yield b"routes:\n  \xc3\x28: {policies: []}\n"
    yield b"routes: {r: {policies: []}}\n\x00\n"
    yield b"routes: {r: {policies: []}}\n\x1b[31m\n"


def deep_nesting(rng: random.Random) -> Iterator[bytes]:
    for depth in (65, 100, 500, 999, 1000, 5000, 100_000):
        yield f"routes: {{r: {{policies: {'[' * depth}{']' * depth}}}}}\n".encode()
        yield f"routes: {'{a: ' * depth}1{'}' * depth}\n".encode()
    for depth in (70, 300):
        yield ("routes:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth))).encode()
        yield ("routes:\n" + "".join("  " * (i + 1) + "-\n" for i in range(depth))).encode()


def alias_bombs(rng: random.Random) -> Iterator[bytes]:
    for levels, fanout in ((6, 10), (7, 9), (9, 5), (12, 3), (20, 2), (4, 400)):
        lines = [f"l0: &l0 [{', '.join(['lol'] * fanout)}]"]
        for level in range(1, levels + 1):
            lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * fanout)}]")
        lines.append(f"routes: {{r: {{policies: *l{levels}}}}}")
        yield ("\n".join(lines) + "\n").encode()
    bomb = "a: &a {" + ", ".join(f"k{i}: [x, y, z]" for i in range(30)) + "}\n"
    bomb += "b: &b {" + ", ".join(f"k{i}: *a" for i in range(60)) + "}\n"
    bomb += "c: &c {" + ", ".join(f"k{i}: *b" for i in range(60)) + "}\n"
    yield (bomb + "routes: {r: {policies: [], x: *c}}\n").encode()
    yield b"routes: &r {r: {policies: [*r]}}\n"
    yield b"a: &a [*a]\nroutes: {}\n"
    yield b"routes: *undefined\n"


def tags_and_garbage(rng: random.Random) -> Iterator[bytes]:
    for tag in (
        "!!int abc",
        "!!float abc",
        "!!timestamp notadate",
        "!!timestamp 2026-13-45",
        "!!binary ===",
        "!!binary aGk=",
        "!!set {a, b}",
        "!!omap [a: 1]",
        "!!pairs [a: 1]",
        "!!python/name:os.system x",
        "!!python/object/apply:os.system ['true']",
        "!custom x",
        "!!str",
        "!!null x",
        "!!bool maybe",
        "!!map [1, 2]",
        "!!seq {a: 1}",
    ):
        yield dump(BASE).decode().replace("seconds: 0.01", f"seconds: {tag}").encode()
    for text in (
        "routes: [unclosed",
        "routes: {r: {policies: []}\n",
        "routes:\n\tr: {}\n",
        "routes: {r: {policies: []}}\nroutes: {}\n",
        "routes:\n  r:\n    policies: []\n  r:\n    policies: []\n",
        "--- {routes: {}}\n--- {routes: {}}\n",
        "%YAML 9.9\n--- {routes: {}}\n",
        "routes: {1: {policies: []}}\n",
        "routes: {on: {policies: []}}\n",
        "routes: {null: {policies: []}}\n",
        "routes: {? [a, b] : {policies: []}}\n",
        "routes: {r: {policies: 2026-01-01}}\n",
        "routes: {2026-13-45: {policies: []}, r: 1}\n",
        "- just\n- a\n- list\n",
        "just a string\n",
        "42\n",
        "null\n",
        "&a routes\n",
        "routes: {r: {policies: [{name: addHeader, version: v1.0.0, "
        "parameters: &p {header: x, value: *p}}]}}\n",
    ):
        yield text.encode()
    valid = dump(BASE)
    for _ in range(25):
        yield bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    for _ in range(15):
        alphabet = "{}[]:,-&*!|>'\"%@` \n\t#?abc123"
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))).encode()
    for _ in range(15):  # a valid document with a few bytes swapped for YAML punctuation
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = ord(rng.choice("{}[]:&*!|>'\"%@`\t"))
        yield bytes(data)


GENERATORS: dict[str, Callable[[random.Random], Iterator[bytes]]] = {
    "types": wrong_types,
    "missing": missing_fields,
    "unknown": unknown_names,
    "numbers": huge_numbers,
    "expressions": bad_expressions,
    "non-utf8": non_utf8,
    "nesting": deep_nesting,
    "aliases": alias_bombs,
    "garbage": tags_and_garbage,
}


def generate() -> list[Case]:
    rng = random.Random(SEED)
    return [
        Case(kind, index, data)
        for kind, generator in GENERATORS.items()
        for index, data in enumerate(generator(rng))
    ]


CASES = generate()


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return registry_from(*POLICIES)


def validate(registry: PolicyRegistry, path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--config", str(path), "--validate"], registry=registry, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_the_base_document_is_valid(registry: PolicyRegistry, tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_bytes(dump(BASE))
    assert validate(registry, path) == (0, "OK: 3 routes\n", "")


def test_there_are_hundreds_of_cases_of_every_kind() -> None:
    kinds = {case.kind for case in CASES}
    assert kinds == set(GENERATORS)
    assert len(CASES) >= 300
    assert len({case.data for case in CASES}) > 0.95 * len(CASES)


def check_rejection(case: Case, path: Path, code: int, out: str, err: str) -> list[str]:
    """What is wrong with the CLI's answer to an invalid document (empty: nothing)."""
    problems = []
    if code != 1:
        problems.append(f"exit {code}, stdout {out!r}")
    if "Traceback" in err or "Traceback" in out:
        problems.append(f"traceback:\n{err[-2000:]}")
    lines = [line for line in err.splitlines() if line.strip()]
    if not lines:
        problems.append("no message")
    elif not all(line.startswith(f"{path}: ") for line in lines):
        problems.append(f"a line does not name the file: {lines!r:.500}")
    return [f"{case.id}: {p}" for p in problems]


def test_validate_rejects_every_document_in_process(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "fuzz.yaml"
    failures: list[str] = []
    for case in CASES:
        path.write_bytes(case.data)
        failures += check_rejection(case, path, *validate(registry, path))
    assert failures == []


SCRIPT = (
    "import sys\n"
    "from engine.main import main\n"
    "from tests.support import registry_from\n"
    f"sys.exit(main(sys.argv[1:], registry=registry_from(*{POLICIES!r})))\n"
)


def sample() -> list[Case]:
    """One case of each kind, plus the shapes that used to be slow or crash: the largest
    alias bomb, 100,000 levels of nesting, a 20,000-digit integer."""
    picked = {kind: next(c for c in CASES if c.kind == kind) for kind in GENERATORS}
    heavy = [
        max((c for c in CASES if c.kind == "aliases"), key=lambda c: len(c.data)),
        next(c for c in CASES if c.kind == "nesting" and b"[" * 100_000 in c.data),
        next(c for c in CASES if c.kind == "numbers" and b"9" * 20_000 in c.data),
    ]
    return [*picked.values(), *heavy]


@pytest.mark.parametrize("case", sample(), ids=lambda c: c.id)
def test_validate_cli_rejects_within_seconds(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(case.data)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--config", str(path), "--validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,  # "within seconds": an alias bomb took minutes before
        check=False,
    )
    assert check_rejection(case, path, done.returncode, done.stdout, done.stderr) == []


def test_hot_reload_of_every_document_keeps_the_serving_config(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "served.yaml"
    path.write_bytes(dump(BASE))
    source = FileConfigSource(path, registry, ConfigStore(), settle=0)
    serving = source.load_initial()
    instances = serving.instances()
    published: list[Snapshot] = []
    source.store.add_listener(published.append)
    for case in CASES:
        path.write_bytes(case.data)
        assert source.check_once() is False, case.id
        assert source.store.current is serving, case.id
    assert published == []
    assert source.store.current.instances() == instances
    # The source still works: a valid edit after all that is published.
    edited = copy.deepcopy(BASE)
    edited["routes"]["extra"] = {"policies": []}
    path.write_bytes(dump(edited))
    assert source.check_once() is True
    assert sorted(source.store.current.routes) == ["extra", "private", "public", "respond"]


async def test_hot_reload_off_the_loop_keeps_the_serving_config(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "served.yaml"
    path.write_bytes(dump(BASE))
    source = FileConfigSource(path, registry, ConfigStore(), settle=0)
    serving = source.load_initial()
    for case in sample():
        path.write_bytes(case.data)
        assert await source.poll() is False, case.id
        assert source.store.current is serving, case.id
