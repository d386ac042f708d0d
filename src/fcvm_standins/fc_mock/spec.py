"""The official Firecracker swagger spec as request validators and a route table.

The spec is read, never copied into the project. Its definitions become JSON Schema (draft 4, which
swagger 2.0 is built on) with `additionalProperties: false` on every object that does not say
otherwise, because Firecracker (serde `deny_unknown_fields`) rejects unknown fields.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fcvm.core.errors import FcvmError

SPEC_ENV = "FCVM_FC_SPEC"
SPEC_NAME = "firecracker-v1.16.1.yaml"
_RELATIVE = Path("..") / "shared" / "firecracker" / SPEC_NAME


class SpecNotFoundError(FcvmError):
    pass


def find_spec(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--spec`, else `$FCVM_FC_SPEC`, else `../shared/firecracker/<spec>` beside the repo checkout
    or any ancestor of the current directory."""
    chosen = explicit or os.environ.get(SPEC_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise SpecNotFoundError(f"Firecracker API spec {path} does not exist")
        return path.resolve()  # absolute: the stand-in jailer hands it on into a jail with another cwd
    repo = Path(__file__).resolve().parents[4]  # src/fcvm/vmm/fc_mock/spec.py -> checkout
    cwd = Path.cwd().resolve()
    candidates = [repo / _RELATIVE] + [d / _RELATIVE for d in (cwd, *cwd.parents)]
    candidates += [d / "shared" / "firecracker" / SPEC_NAME for d in (cwd, *cwd.parents)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SpecNotFoundError(
        f"cannot find the Firecracker API spec {SPEC_NAME}",
        hint=f"pass --spec PATH or set {SPEC_ENV}",
    )


def _close_objects(node: Any) -> None:
    """Set additionalProperties: false on every object schema that leaves it open by default."""
    if isinstance(node, dict):
        is_object = node.get("type") == "object" or "properties" in node
        if is_object and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # "/drives/{drive_id}"
    pattern: re.Pattern[str]
    body: str | None  # definition name of the body, if the operation takes one
    body_required: bool
    operation: str
    partial: bool = False  # a PATCH taking the PUT's definition: every field optional (machine-config)


class Spec:
    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open() as f:
            self.doc: dict[str, Any] = yaml.safe_load(f)
        self.version: str = str(self.doc["info"]["version"])
        self.definitions: dict[str, Any] = copy.deepcopy(self.doc["definitions"])
        _close_objects(self.definitions)
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self.routes: list[Route] = []
        for template, ops in self.doc["paths"].items():
            regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            for method, op in ops.items():
                body = _body_of(op)
                required = any(p.get("in") == "body" and p.get("required") for p in op.get("parameters", []))
                put_body = _body_of(ops.get("put", {}))
                partial = method == "patch" and body is not None and body == put_body
                self.routes.append(Route(method.upper(), template, re.compile(regex), body, required,
                                         op.get("operationId", ""), partial))

    def validator(self, definition: str, *, partial: bool = False) -> jsonschema.protocols.Validator:
        key = f"{definition}{'~partial' if partial else ''}"
        if key not in self._validators:
            if definition not in self.definitions:
                raise KeyError(f"no definition {definition!r} in {self.path}")
            schema = dict(self.definitions[definition])
            if partial:
                schema.pop("required", None)
            schema["definitions"] = self.definitions
            self._validators[key] = jsonschema.Draft4Validator(schema)
        return self._validators[key]

    def errors(self, definition: str, body: Any, *, partial: bool = False) -> list[str]:
        """Human-readable violations, empty when `body` is valid."""
        messages = []
        validator = self.validator(definition, partial=partial)
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            messages.append(_describe(error))
        return messages

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, path parameters, path_known)."""
        path_known = False
        for route in self.routes:
            found = route.pattern.match(path)
            if found:
                path_known = True
                if route.method == method:
                    return route, found.groupdict(), True
        return None, {}, path_known


def _body_of(op: dict[str, Any]) -> str | None:
    for param in op.get("parameters", []):
        if param.get("in") == "body":
            ref = str(param["schema"].get("$ref", ""))
            return ref.rsplit("/", 1)[-1] or None
    return None


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        names = ", ".join(f"`{n}`" for n in extra)
        expected = ", ".join(f"`{n}`" for n in allowed)
        prefix = f"in `{where}`: " if where else ""
        return f"{prefix}unknown field {names}, expected one of {expected}"
    if error.validator == "required":
        return f"{'in `' + where + '`: ' if where else ''}{error.message}"
    return f"`{where}`: {error.message}" if where else error.message


@cache
def load(path: Path | None = None) -> Spec:
    return Spec(path or find_spec())
