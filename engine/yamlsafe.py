"""Reading YAML that people (and attackers) write: definitions, configs, manifests.

:func:`load_yaml` turns one YAML document into JSON-like Python data (``dict`` with
``str`` keys, ``list``, ``str``, ``int``, ``float``, ``bool``, ``None``) or raises
:class:`YamlError` whose text reads ``line L, column C: problem``. It never raises
anything else, whatever the input (the config-fuzz test holds it to that).

What it refuses, and why:

* **Duplicate keys.** PyYAML silently keeps the last one, which hides typos such as a
  route configured twice. Merge keys (``<<``) may still be overridden.
* **Tags beyond JSON's types** (``!!timestamp``, ``!!binary``, ``!!set``, ``!!omap``,
  ``!!pairs``, ``!python/...``): configuration is JSON-like (an xDS source carries
  JSON), and tuples, sets or dates only break later stages. Unquoted dates such as
  ``2026-01-01`` are read as strings (YAML 1.2's core schema has no timestamps), so a
  bad date (``2026-13-45``) is just a string, never a crash.
* **A scalar its tag cannot hold** (``!!int abc``, ``!!float abc``, an integer of more
  than 4,300 digits): an error at that line instead of a ``ValueError`` escaping.
* **Non-string mapping keys** (``1: x``, ``on: x``, ``null: x``): JSON objects have
  string keys; quote the key.
* **Alias bombs.** Aliases are shared nodes, cheap to parse but expanded by everything
  that copies, hashes, serialises or prints the data (a 576-byte "billion laughs" took
  4.7 s in ``canonical_json``). Aliases may add at most :data:`MAX_ALIAS_EXPANSION`
  nodes beyond the document as written, and may not refer to themselves.
* **Deep nesting**: more than :data:`MAX_DEPTH` levels. Later stages (JSON Schema,
  ``copy.deepcopy``, JSON, CEL) recurse over the data; CEL crashed the process on a
  metadata value nested 100,000 levels deep.

Non-finite floats (``.nan``, ``.inf``) are valid YAML and are read; the stages that
accept numbers reject them with the field's name (see
:func:`engine.definition.non_finite_paths`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import yaml

__all__ = ["MAX_ALIAS_EXPANSION", "MAX_DEPTH", "YamlError", "load_yaml"]

MAX_ALIAS_EXPANSION: Final = 100_000
"""How many nodes aliases may add to a document (each ``*ref`` adds its anchor's size)."""

MAX_DEPTH: Final = 64
"""Deepest nesting of sequences and mappings accepted."""

_TAG: Final = "tag:yaml.org,2002:"
_ALLOWED_TAGS: Final = frozenset(
    _TAG + name for name in ("null", "bool", "int", "float", "str", "seq", "map", "merge")
)
_STR_KEY_TAGS: Final = frozenset({_TAG + "str", _TAG + "merge"})

# libyaml's parser when the wheel has it (12x faster on the demo config, and it bounds
# nesting itself); PyYAML's own otherwise. Construction is Python either way.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlError(ValueError):
    """A YAML document could not be read; ``str()`` reads ``line L, column C: problem``."""


class _StrictLoader(_Base):  # type: ignore[misc]  # PyYAML's loaders are untyped
    """Safe loader: no timestamps, duplicate keys rejected, scalar errors marked."""

    # YAML 1.1 resolves unquoted dates to datetime objects; read them as strings.
    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, Any]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TAG + "timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            kind = node.tag.removeprefix(_TAG)
            value = node.value if isinstance(node, yaml.ScalarNode) else ""
            shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown!r} as {kind}: {_short(exc)}", node.start_mark
            ) from None


def _short(exc: BaseException) -> str:
    text = str(exc).split(";")[0]  # the int-digits message goes on about sys.set_int_max...
    return text if len(text) <= 120 else text[:120] + "..."


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        # Keys are plain strings here (_check_graph ran first); merge keys (``<<``)
        # may legitimately be overridden, so they are not counted.
        if key_node.tag != _TAG + "merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
    loader.flatten_mapping(node)
    return dict(loader.construct_mapping(node, deep=True))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _error(node: yaml.Node, problem: str) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=node.start_mark)


def _check_graph(root: yaml.Node) -> None:
    """Reject unsupported tags, non-string keys, self-referring aliases, nesting
    deeper than MAX_DEPTH and alias expansion beyond MAX_ALIAS_EXPANSION, before
    anything is constructed (so no stage ever sees an expanded bomb)."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size, for nodes fully walked
    active: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in active:
            raise _error(node, "an alias refers to the node that contains it")
        if node.tag not in _ALLOWED_TAGS:
            raise _error(
                node,
                f"tag {node.tag.replace(_TAG, '!!')!r} is not supported (configuration is "
                "JSON-like: strings, numbers, booleans, null, lists and mappings)",
            )
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            return 1
        if depth >= MAX_DEPTH:
            raise _error(node, f"nested more than {MAX_DEPTH} levels deep")
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag not in _STR_KEY_TAGS:
                    shown = key.value if isinstance(key, yaml.ScalarNode) else "a collection"
                    raise _error(
                        key, f"mapping keys must be strings, got {shown!r} (quote the key)"
                    )
                sizes.setdefault(id(key), 1)
                size += 1 + walk(value, depth + 1)
        else:
            for item in node.value:
                size += walk(item, depth + 1)
        active.discard(id(node))
        sizes[id(node)] = size
        return size

    expanded = walk(root, 0)
    if expanded - len(sizes) > MAX_ALIAS_EXPANSION:
        raise _error(
            root,
            f"aliases expand this document by {expanded - len(sizes):,} nodes "
            f"(at most {MAX_ALIAS_EXPANSION:,} are accepted; is it an alias bomb?)",
        )


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document safely; raise :class:`YamlError` naming line and column.

    Empty input gives ``None``. See the module docstring for what is refused.
    """
    try:
        loader = _StrictLoader(text)
    except yaml.YAMLError as exc:  # the reader checks the encoding up front
        raise YamlError(_describe(exc)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlError(_describe(exc)) from None
    except RecursionError:  # PyYAML's pure-Python parser composes recursively
        raise YamlError("nested too deeply (more levels than the YAML reader supports)") from None
    except (ValueError, TypeError, AttributeError) as exc:  # e.g. bytes no codec can read
        raise YamlError(f"cannot read: {_short(exc)}") from None
    finally:
        loader.dispose()


def _describe(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(part.strip() for part in (exc.context, exc.problem) if part)
        return f"{where}{what or 'invalid YAML'}"
    return " ".join(str(exc).split())  # ReaderError: one line, position included
