"""The JSON documents migrator writes (reports, ``--json`` outputs): their header, typed reading
and their JSON Schema, all from the frozen dataclasses that hold them.

Every document starts with the same header, so that a script can tell what it holds and which
run it came from without guessing from its shape: ``schema`` {``name``, ``version``} (the name
says the kind: ``migrator.migration``, ``migrator.checkpoint``, ``migrator.receive``…; the
version grows when a field changes meaning or goes away, not when one is added),
``migrator_version``, ``started_at`` (ISO 8601, UTC), ``id`` (the migration's id, the same on
both ends) and ``peer`` (the other end: the receiver's address, the source's, the image
directory).

A document read back is hostile input (a file anyone may have written): ``read`` checks the
header, then msgspec converts the rest into the dataclass, type by type, and a wrong field
becomes one line naming it (``'rounds[2].dirty_pages': expected int, got str``). The files in
``docs/schemas/`` are generated from the same dataclasses (``json_schema``; a test keeps them
current), so the documentation, the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import MigratorError

VERSION = 1          # of every schema below; a reader refuses other versions
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Schema:
    """What a document is: ``name`` (its kind) and the ``version`` of that kind's fields."""

    name: str
    version: int = VERSION


def header(name: str, *, id: str, peer: str | None, started_at: str) -> dict[str, Any]:
    """The header fields of a new document, as keyword arguments for its dataclass."""
    return {"schema": Schema(name), "migrator_version": migrator_version(), "started_at": started_at,
            "id": id, "peer": peer}


@functools.cache
def migrator_version() -> str:
    """The installed migrator's version (the package's metadata, as ``--version`` says it)."""
    try:
        return importlib.metadata.version("migrator")
    except importlib.metadata.PackageNotFoundError:      # run from a source tree, not installed
        return "unknown"


def utc_now() -> str:
    """Now, as ``started_at`` says it: ISO 8601 in UTC to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(value: object) -> object:
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def to_data(document: object) -> dict:
    """``document`` (a dataclass) as JSON data (lists, not tuples: equal to the document read back
    from its file), its fields in declaration order."""
    import msgspec     # here, not at the top: ``import migrator`` stays cheap

    return msgspec.json.decode(msgspec.json.encode(document, enc_hook=_encode))


def convert(kind: Any, data: object) -> Any:
    """``data`` (parsed JSON) as a ``kind`` value, every field type-checked; MigratorError with
    one line naming the first bad field."""
    import msgspec

    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise MigratorError(_one_line(str(exc))) from None


def read(cls: type[T], data: object) -> T:
    """``data`` (parsed JSON) as a ``cls`` document; MigratorError with one line naming what is
    wrong: not an object, another kind or version, a missing field or one of the wrong type."""
    name = cls.SCHEMA
    if not isinstance(data, dict):
        raise MigratorError(f"a {name} document is a JSON object, not {type(data).__name__}")
    schema = data.get("schema")
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
        raise MigratorError("no 'schema' {name, version}: not a migrator document (or one older than its schemas)")
    if schema["name"] != name:
        raise MigratorError(f"a {schema['name']!r} document, not a {name!r} one")
    if schema.get("version") != VERSION:
        raise MigratorError(f"{name} version {schema.get('version')!r}; this migrator reads version {VERSION}")
    return convert(cls, data)


_AT = re.compile(r"^(?P<what>.*?) - at \$(?P<path>\S*)$")


def _one_line(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.rounds[0].x`" as "'rounds[0].x': expected int, got str"."""
    message = message.splitlines()[0].replace("`", "")
    match = _AT.match(message)
    what, path = (match["what"], match["path"].lstrip(".")) if match else (message, "")
    what = what[:1].lower() + what[1:]
    return f"{path!r}: {what}" if path else what


def json_schema(cls: type) -> dict:
    """The JSON Schema (2020-12) of ``cls`` documents, with their ``schema`` header pinned."""
    import msgspec

    generated = msgspec.json.schema(cls)
    defs = generated["$defs"]
    root = defs.pop(cls.__name__)
    root["properties"]["schema"] = {"const": {"name": cls.SCHEMA, "version": VERSION},
                                    "description": "what this document is: its kind and the version of its fields"}
    defs.pop("Schema", None)
    doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{cls.SCHEMA}.v{VERSION}.json",
           **root}
    if defs:
        doc["$defs"] = defs
    return doc
