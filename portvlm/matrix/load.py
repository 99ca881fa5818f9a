"""matrix.yaml → Matrix: YAML with line numbers, then the JSON Schema, then cross-reference checks.

Every failure is one `MatrixError(path, line, "what is wrong; how to fix it")`; nothing else escapes
`parse_matrix` or `load_matrix` (tests/unit/test_matrix_fuzz.py holds us to that).
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from portvlm import versions
from portvlm.errors import MatrixError
from portvlm.matrix.expand import first_expectation
from portvlm.matrix.schema import Arch, Expectation, Matrix, Model, Override, Stack, cell_id

FORMAT_VERSION = 1
ENV_VAR = "PORTVLM_MATRIX"
SCHEMA_FILE = "matrix.schema.json"

# The real matrix is ~7 KB, ~600 nodes, 4 levels deep; these bounds only stop hostile or broken input
# (alias bombs, runaway nesting) before it costs time or memory.
MAX_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 32

SECTIONS = {"archs": "arch", "stacks": "stack", "models": "model", "expectations": "expectation"}

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp", "binary"))
_SYNTAX_FIX = (
    "fix the YAML syntax here (indent with spaces, quote values that contain ': ' or ' #', close brackets and quotes)"
)

JsonPath = tuple  # a JSON path into the document: ("archs", 1, "stacks", 0)


# --------------------------------------------------------------------------------------------- entry points


def load_matrix(path: str | os.PathLike[str] | None = None) -> Matrix:
    """Read and validate a matrix: ``path``, else the packaged one (never the cwd's, never ``$PORTVLM_MATRIX``)."""
    return _load(*_resolve(path))


def cli_matrix_path(path: str | os.PathLike[str] | None = None, environ=None) -> str | None:
    """The matrix a command line reads: its option, else ``$PORTVLM_MATRIX``, else ``None`` (the packaged one).

    Only the command lines call this: the library reads the matrix it is handed or the packaged one.
    """
    environ = os.environ if environ is None else environ
    return os.fspath(path) if path is not None else (environ.get(ENV_VAR) or None)


def cli_matrix(path: str | os.PathLike[str] | None = None, environ=None) -> Matrix:
    """``load_matrix(cli_matrix_path(path))``; a missing ``$PORTVLM_MATRIX`` file is named as the env var's."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_VAR):
        return _load(environ[ENV_VAR], f"${ENV_VAR} names it; point ${ENV_VAR} at an existing file or unset it")
    return load_matrix(path)


def _load(shown: str, hint: str) -> Matrix:
    try:
        data = _read_bytes(shown)
    except FileNotFoundError:
        raise _fail(shown, None, f"no such file; {hint}") from None
    except IsADirectoryError:
        raise _fail(shown, None, f"is a directory, not a file; {hint}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise _fail(shown, None, f"cannot read it ({reason}); {hint}") from None
    return parse_matrix(data, shown)


def parse_matrix(text: str | bytes, path: str | os.PathLike[str] = "matrix.yaml") -> Matrix:
    """Validate matrix.yaml text (or bytes) and build the Matrix; raises only MatrixError."""
    path = str(path)
    try:
        return _parse(text, path)
    except MatrixError:
        raise
    except RecursionError:
        raise _fail(
            path, None, "the document is nested too deeply; the matrix is at most 4 levels deep, check the indentation"
        ) from None
    except MemoryError:
        raise _fail(
            path, None, "the document is too large to read; keep matrix.yaml small and free of YAML alias chains"
        ) from None
    except Exception as exc:  # noqa: BLE001 — the contract is "only MatrixError escapes"
        # Reaching this is a portvlm bug (a case without its own message); still give the one-line form.
        raise _fail(
            path,
            None,
            f"could not read the matrix ({type(exc).__name__}: {_clip(str(exc))}); "
            f"check the file against portvlm/matrix/{SCHEMA_FILE} and report this message",
        ) from None


def _resolve(path) -> tuple[str, str]:
    """(the path to read and show in errors, how to fix a missing file)."""
    if path is not None:
        return os.fspath(path), "pass an existing matrix file (--file PATH)"
    # Never the current directory nor the environment: a library call must not depend on where or how the process
    # was started. The checkout's ./matrix.yaml is a link to this packaged file, so both name one matrix.
    return packaged_path(), "reinstall portvlm (its packaged matrix is missing)"




def packaged_path() -> str:
    """The matrix portvlm ships (portvlm/data/matrix.yaml; the checkout's ./matrix.yaml links to it)."""
    return str(resources.files("portvlm").joinpath("data", "matrix.yaml"))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_BYTES + 1)  # enough to tell "too large" without reading a huge file


def _parse(text: str | bytes, path: str) -> Matrix:
    if len(text) > MAX_BYTES:  # checked before decoding: load_matrix reads at most MAX_BYTES + 1 bytes
        raise _fail(
            path, None, f"the file is larger than {MAX_BYTES} bytes; the matrix is a few KB — is this the right file?"
        )
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text), path)
    doc = _Doc(path, _Lines(text))
    node = _compose(text, path)
    doc.data = None if node is None else doc.convert(node, (), 0)
    _check_top(doc)
    _check_schema(doc)
    _check_cross(doc)
    return _build(doc)


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a BOM is tolerated
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(path, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save matrix.yaml as UTF-8") from None


# --------------------------------------------------------------------------------------------- YAML → data + lines


class _TooDeep(Exception):
    def __init__(self, mark):
        super().__init__()
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops at MAX_DEPTH nesting while scanning.

    Deep flow nesting ("[[[[...") costs PyYAML's scanner quadratic time and its composer a RecursionError;
    the pure-Python loader is used at all because the C one segfaults on it.
    """

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            raise _TooDeep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        if len(self.indents) >= MAX_DEPTH:
            raise _TooDeep(self.get_mark())
        return super().add_indent(column)


def _compose(text: str, path: str) -> yaml.Node | None:
    """The YAML node graph, whose nodes keep their start marks."""
    try:
        loader = _Loader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except _TooDeep as exc:
        raise _fail(
            path,
            _Lines(text).at(exc.mark),
            f"nested deeper than {MAX_DEPTH} levels; the matrix is at most 4 levels deep, check the brackets and indentation",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        lines = _Lines(text)
        line = lines.at(mark) if mark is not None else None
        problem = exc.problem or "unreadable YAML"
        if exc.context and exc.context_mark is not None:
            problem += f" ({exc.context} at line {lines.at(exc.context_mark)})"
        elif exc.context:
            problem += f" ({exc.context})"
        fix = "indent with spaces, not tabs" if "\\t" in problem or "\t" in problem else _SYNTAX_FIX
        if "expected a single document" in problem:
            fix = "keep one YAML document (remove the extra '---')"
        raise _fail(path, line, f"invalid YAML: {problem}; {fix}") from None
    except yaml.reader.ReaderError as exc:
        position = max(0, min(exc.position, len(text)))
        line = text[:position].count("\n") + 1
        raise _fail(
            path,
            line,
            f"character U+{_code(exc.character):04X} is not allowed in YAML; delete it (control characters and unpaired surrogates cannot appear)",
        ) from None
    except yaml.YAMLError as exc:
        raise _fail(path, None, f"invalid YAML: {_clip(str(exc))}; {_SYNTAX_FIX}") from None


class _Lines:
    """Line numbers as editors, grep and sed count them: by "\\n" only.

    PyYAML's own marks also break lines at NEL, U+2028 and U+2029 (YAML 1.1), which would point elsewhere.
    """

    def __init__(self, text: str):
        self._newlines = [m.start() for m in re.finditer("\n", text)]

    def at(self, mark) -> int:
        return bisect.bisect_left(self._newlines, mark.index) + 1


@dataclass
class _Doc:
    """The document as plain data, plus the source line of every key and item (JSON path → line)."""

    path: str
    source: _Lines
    data: Any = None
    lines: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # JSON path → scalar as written (to explain `python: 3.10` → 3.1)
    nodes: int = 0
    seen: set = field(default_factory=set)  # ids of nodes converted once (a second visit is an alias)
    _constructor: yaml.SafeLoader = field(default_factory=lambda: yaml.SafeLoader(""))

    def line(self, path: JsonPath) -> int | None:
        """The line of `path`, or of its nearest recorded ancestor."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def error(self, path: JsonPath, message: str) -> MatrixError:
        return MatrixError(self.path, self.line(path), _one_line(message))

    def convert(self, node: yaml.Node, path: JsonPath, depth: int, active: frozenset = frozenset()) -> Any:
        if id(node) in self.seen:
            # An alias: its node carries the anchor's position, so blame the place that uses it.
            line = self.lines.get(path) or self.line(path[:-1]) or self.source.at(node.start_mark)
        else:
            self.seen.add(id(node))
            line = self.source.at(node.start_mark)
        self.lines.setdefault(path, line)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _fail(
                self.path,
                line,
                f"the document expands to more than {MAX_NODES} values (YAML aliases?); write the matrix out plainly",
            )
        if depth > MAX_DEPTH:
            raise _fail(
                self.path,
                line,
                f"nested deeper than {MAX_DEPTH} levels; the matrix is at most 4 levels deep, check the indentation",
            )
        if id(node) in active:
            raise _fail(
                self.path,
                line,
                "a YAML alias refers to a value that contains it (a cycle); replace the alias with the value written out",
            )
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path, line)
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _YAML + "seq":
                raise self._tag_error(node, line)
            return [self.convert(item, (*path, index), depth + 1, active) for index, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != _YAML + "map":
                raise self._tag_error(node, line)
            return self._mapping(node, path, depth, active)
        raise _fail(
            self.path, line, f"unexpected YAML node {type(node).__name__}; write plain mappings, lists and scalars"
        )

    def _mapping(self, node: yaml.MappingNode, path: JsonPath, depth: int, active: frozenset) -> dict:
        result: dict = {}
        key_lines: dict = {}
        for key_node, value_node in node.value:
            key_line = self.source.at(key_node.start_mark)
            if key_node.tag == _YAML + "merge":
                raise _fail(
                    self.path,
                    key_line,
                    "YAML merge keys ('<<') are not supported; write the keys out (an alias for a whole value is fine)",
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail(
                    self.path, key_line, "a mapping key is a list or mapping; keys must be plain words such as `id:`"
                )
            key = self._scalar(key_node, None, key_line)
            if not isinstance(key, str):
                raise _fail(
                    self.path,
                    key_line,
                    f"key {key_node.value!r} is read by YAML as {_kind(key)} {_show(key)}, not a string; keys are plain words — quote it or rename it",
                )
            if key in result:
                raise _fail(
                    self.path,
                    key_line,
                    f"duplicate key {_show(key)} (first at line {key_lines[key]}); keep one of them",
                )
            key_lines[key] = key_line
            self.lines[(*path, key)] = key_line
            result[key] = self.convert(value_node, (*path, key), depth + 1, active)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: JsonPath | None, line: int) -> Any:
        if node.tag not in _SCALAR_TAGS:
            raise self._tag_error(node, line)
        if path is not None:
            self.raw[path] = node.value
        try:
            return self._constructor.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001 — bad dates, 5000-digit ints, broken base64 ...
            raise _fail(
                self.path,
                line,
                f"cannot read the value {_clip(repr(node.value), 40)} ({_clip(str(exc), 60)}); quote it to make it a string",
            ) from None

    def _tag_error(self, node: yaml.Node, line: int) -> MatrixError:
        return MatrixError(
            self.path,
            line,
            f"unsupported YAML tag {_clip(node.tag)!s}; remove the tag (matrix.yaml holds plain mappings, lists, strings and numbers)",
        )


# --------------------------------------------------------------------------------------------- shape checks


def _check_top(doc: _Doc) -> None:
    data = doc.data
    if data is None:
        raise _fail(
            doc.path, 1, "the file is empty; start it with `version: 1` and declare archs:, stacks: and models:"
        )
    if not isinstance(data, dict):
        raise doc.error(
            (),
            f"the top level is {_kind(data)}, not a mapping; write `version: 1` then the archs:, stacks: and models: sections as top-level keys",
        )
    if "version" not in data:
        raise _fail(
            doc.path,
            1,
            f"missing `version: {FORMAT_VERSION}`; add it as the first line (the format version of matrix.yaml)",
        )
    version = data["version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise doc.error(
            ("version",),
            f"version is {_show(version)}; this portvlm reads matrix format {FORMAT_VERSION} — write `version: {FORMAT_VERSION}`",
        )


@lru_cache(maxsize=1)
def _validator():
    import jsonschema  # heavy; only the loader needs it

    text = resources.files("portvlm.matrix").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema() -> dict:
    """The JSON Schema of matrix.yaml (portvlm/matrix/matrix.schema.json)."""
    return _validator().schema


def _check_schema(doc: _Doc) -> None:
    errors = list(_validator().iter_errors(doc.data))
    if not errors:
        return
    # A missing key beside an unknown one is usually a misspelling: report the unknown key (it says "did you mean").
    misspelt = {tuple(e.absolute_path) for e in errors if e.validator == "additionalProperties"}
    errors = [e for e in errors if not (e.validator == "required" and tuple(e.absolute_path) in misspelt)] or errors

    # Report the error nearest the top of the file; at one line, the most specific (deepest) one.
    def rank(err):
        path = tuple(err.absolute_path)
        return (doc.line(_error_path(err, doc.data)) or 0, -len(path), _VALIDATOR_ORDER.get(err.validator, 99))

    err = min(errors, key=rank)
    path = _error_path(err, doc.data)
    raise doc.error(path, _schema_message(err, doc))


_VALIDATOR_ORDER = {"additionalProperties": 0, "required": 1, "type": 2, "enum": 3, "const": 3}

_PATTERN_HINTS = {
    "id": "ids are letters and digits joined by single '.', '_' or '-' (cell ids join them with '--'), e.g. cpu-tf4.57.6",
    "python": 'write the Python minor version as a quoted string, e.g. python: "3.11"',
    "gfx": "write the ROCm gfx target, e.g. gfx942",
    "torch_variant": "write the torch build variant, e.g. cpu, cu126, rocm6.4",
    "image": "write a lowercase image name with an optional :tag, e.g. portvlm/sm70-cu126-torch2.13.0",
    "base_image": "write a lowercase image name with a :tag (optionally @sha256:...), e.g. nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04",
    "family": "write the transformers model_type, e.g. qwen2_5_vl",
}
_ID_LISTS = frozenset(("stacks", "archs", "models"))


def _error_path(err, data) -> JsonPath:
    """The JSON path to blame: for an unknown key, the key itself."""
    path = tuple(err.absolute_path)
    if err.validator in ("additionalProperties",) and isinstance(err.instance, dict):
        extra = _unknown_keys(err)
        if extra:
            return (*path, extra[0])
    return path


def _unknown_keys(err) -> list[str]:
    allowed = set(err.schema.get("properties", {}))
    patterns = list(err.schema.get("patternProperties", {}))
    return [k for k in err.instance if k not in allowed and not any(re.search(p, k) for p in patterns)]


def _schema_message(err, doc: _Doc) -> str:
    path = tuple(err.absolute_path)
    where = _where(doc.data, path)
    value = err.instance
    kind = err.validator
    key = _last_key(path)
    if kind == "additionalProperties":
        extra = _unknown_keys(err)
        allowed = sorted(err.schema.get("properties", {}))
        name = extra[0] if extra else "?"
        return f"unknown key {_show(name)} in {_owner(doc.data, path)}; remove it or fix its spelling{_did_you_mean(name, allowed)} (allowed: {', '.join(allowed)})"
    if kind == "required":
        missing = [p for p in err.validator_value if p not in value]
        name = missing[0] if missing else "?"
        return f"{_owner(doc.data, path)} is missing the required key {name!r}; add `{name}: ...` (required: {', '.join(err.validator_value)})"
    if kind == "type":
        return _type_message(err, doc, path, where, key)
    if kind == "enum":
        choices = [str(c) for c in err.validator_value]
        near = _did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"{where} is {_show(value)}, not one of: {', '.join(choices)}; use one of those{near}"
    if kind == "const":
        return f"{where} is {_show(value)}; write {json.dumps(err.validator_value)}"
    if kind == "uniqueItems":
        dup = _first_duplicate(value)
        return f"{where} lists {_show(dup)} more than once; list each once"
    if kind == "minItems":
        if key == "capability":
            return f"{where} must be [major, minor], e.g. capability: [8, 0]; add the missing number"
        return f"{where} is empty; list at least one"
    if kind == "maxItems":
        if key == "capability":
            return f"{where} must be [major, minor], e.g. capability: [8, 0]; drop the extra numbers"
        return f"{where} has more than {err.validator_value} items; shorten it"
    if kind in ("minimum", "maximum"):
        return f"{where} is {_show(value)}, outside 0..99; a compute capability is [major, minor], e.g. [9, 0]"
    if kind in ("pattern", "minLength"):
        is_id = key == "id" or (bool(path) and isinstance(path[-1], int) and key in _ID_LISTS)
        hint_key = "id" if is_id else key
        hint = _PATTERN_HINTS.get(hint_key)
        if hint is None:
            hint = (
                "write some text (it is shown in the support table)"
                if isinstance(value, str) and not value.strip()
                else "see portvlm/matrix/matrix.schema.json"
            )
        blank = (
            "is blank"
            if isinstance(value, str) and not value.strip()
            else f"is {_show(value)}, which is not valid here"
        )
        return f"{where} {blank}; {hint}"
    if kind == "maxLength":
        return f"{where} is longer than {err.validator_value} characters; shorten it"
    return f"{where}: {_clip(err.message)}; see portvlm/matrix/{SCHEMA_FILE}"


def _type_message(err, doc: _Doc, path: JsonPath, where: str, key: str | None) -> str:
    wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    names = {
        "string": "a string",
        "array": "a list",
        "object": "a mapping",
        "integer": "an integer",
        "boolean": "true or false",
        "number": "a number",
        "null": "empty",
    }
    want = " or ".join(names.get(w, w) for w in wanted)
    value = err.instance
    raw = doc.raw.get(path)
    if value is None and path and isinstance(path[-1], str):
        fix = "write `[]`" if "array" in wanted else "fill it in"
        return f"{where} must be {want}, found nothing; {fix} or remove the key"
    if "string" in wanted and raw is not None and not isinstance(value, str):
        return f'{where} must be a string, but YAML reads {_clip(raw, 40)} as {_kind(value)} ({_show(value)}); quote it: {key or "value"}: "{_clip(raw, 40)}"'
    if "array" in wanted and key == "capability":
        return (
            f"{where} must be a list [major, minor], found {_kind(value)} {_show(value)}; write e.g. capability: [8, 0]"
        )
    if "array" in wanted and isinstance(value, str):
        return f"{where} must be a list, found the string {_show(value)}; write it as a list: [{_clip(value)}]"
    return (
        f"{where} must be {want}, found {_kind(value)} {_show(value)}; write {want} (see portvlm/matrix/{SCHEMA_FILE})"
    )


# --------------------------------------------------------------------------------------------- cross checks


def _check_cross(doc: _Doc) -> None:
    """Checks the schema cannot express, in phases (later ones need earlier ones clean).

    Within a phase the problem nearest the top of the file is reported.
    """
    phases = (
        (_check_duplicates,),  # a duplicate id also breaks every reference to it: report the cause
        (_check_versions, _check_overrides, _check_vendor_fields, _check_references),
        (_check_images, _check_coverage),
    )
    for checks in phases:
        problems = [err for check in checks for err in check(doc)]
        if problems:
            raise min(problems, key=lambda err: err.line or 0)


def _items(doc: _Doc, section: str):
    return list(enumerate(doc.data.get(section) or ()))


def _check_duplicates(doc: _Doc):
    for section, kind in SECTIONS.items():
        if section == "expectations":
            continue
        first: dict[str, int] = {}
        for index, item in _items(doc, section):
            line = doc.line((section, index, "id"))
            if item["id"] in first:
                yield doc.error(
                    (section, index, "id"),
                    f"duplicate {kind} id {item['id']!r} (first declared at line {first[item['id']]}); {kind} ids must be unique — rename or remove one",
                )
            else:
                first[item["id"]] = line


_VERSION_FIELDS = {"stacks": ("torch", "transformers", "xformers", "flash_attn"), "models": ("min_transformers",)}


def _check_versions(doc: _Doc):
    for section, fields in _VERSION_FIELDS.items():
        kind = SECTIONS[section]
        for index, item in _items(doc, section):
            for name in fields:
                if name not in item:
                    continue
                try:
                    versions.parse(item[name])
                except versions.InvalidVersion:
                    yield doc.error(
                        (section, index, name),
                        f"{kind} {item['id']!r}: {name} {_show(item[name])} is not a valid version; write an exact release such as 4.57.6 (ranges belong in expectations:)",
                    )
    for index, item in _items(doc, "expectations"):
        if "transformers" not in item:
            continue
        try:
            versions.specifier(item["transformers"])
        except versions.InvalidSpecifier:
            yield doc.error(
                ("expectations", index, "transformers"),
                f'expectation transformers {_show(item["transformers"])} is not a valid version specifier; write a PEP 440 range such as "<4.57.1" or ">=4.50,<5"',
            )


def _check_overrides(doc: _Doc):
    # An override names one package three times (package, pin, install): they must agree, or the env build would
    # exclude or replace something other than what the reason talks about.
    for index, item in _items(doc, "stacks"):
        for position, override in enumerate(item.get("overrides") or ()):
            package = canonicalize_name(override["package"])
            fields = [("pin", override["pin"])] + ([] if override["install"] == "none" else [("install", override["install"])])
            for name, text in fields:
                path = ("stacks", index, "overrides", position, name)
                try:
                    requirement = Requirement(text)
                except InvalidRequirement:
                    yield doc.error(path, f"stack {item['id']!r}: override {name} {_show(text)} is not a requirement; write one such as \"{override['package']}>=0.19.1,<0.20\"" + (" (or install: none to leave the package out)" if name == "install" else ""))
                    continue
                if canonicalize_name(requirement.name) != package:
                    yield doc.error(path, f"stack {item['id']!r}: override {name} {_show(text)} names {requirement.name!r}, not the override's package {override['package']!r}; one override per package")


def _check_vendor_fields(doc: _Doc):
    # Hardware facts the policy needs: CUDA archs are gated on capability, ROCm archs on the gfx target.
    for index, item in _items(doc, "archs"):
        vendor, arch = item["vendor"], item["id"]
        if vendor == "nvidia" and "capability" not in item:
            yield doc.error(
                ("archs", index),
                f"arch {arch!r} (vendor nvidia) has no capability; add its CUDA compute capability, e.g. capability: [8, 0]",
            )
        if vendor == "amd" and "gfx" not in item:
            yield doc.error(
                ("archs", index), f"arch {arch!r} (vendor amd) has no gfx; add its ROCm target, e.g. gfx: gfx942"
            )
        if vendor != "nvidia" and "capability" in item:
            yield doc.error(
                ("archs", index, "capability"),
                f"arch {arch!r} (vendor {vendor}) declares a CUDA capability; remove it (only vendor nvidia has one)",
            )
        if vendor != "amd" and "gfx" in item:
            yield doc.error(
                ("archs", index, "gfx"),
                f"arch {arch!r} (vendor {vendor}) declares a gfx target; remove it (only vendor amd has one)",
            )


def _check_references(doc: _Doc):
    known = {section: [item["id"] for _, item in _items(doc, section)] for section in ("archs", "stacks", "models")}
    for index, item in _items(doc, "archs"):
        for position, ref in enumerate(item["stacks"]):
            if ref not in known["stacks"]:
                yield doc.error(
                    ("archs", index, "stacks", position),
                    f"stack {ref!r} referenced by arch {item['id']!r} is not declared under stacks:; declare it or fix the id{_did_you_mean(ref, known['stacks'])} (known: {', '.join(known['stacks'])})",
                )
    for index, item in _items(doc, "expectations"):
        for section in ("archs", "models", "stacks"):
            for position, ref in enumerate(item.get(section, ())):
                if ref not in known[section]:
                    kind = SECTIONS[section]
                    yield doc.error(
                        ("expectations", index, section, position),
                        f"{kind} {ref!r} named by an expectation is not declared under {section}:; fix the id or remove it{_did_you_mean(ref, known[section])} (known: {', '.join(known[section])})",
                    )


def _check_images(doc: _Doc):
    stacks = {item["id"]: (index, item) for index, item in _items(doc, "stacks")}
    for arch_index, arch in _items(doc, "archs"):
        if arch.get("runtime", "host") != "container":
            continue
        for position, ref in enumerate(arch["stacks"]):
            stack_index, stack = stacks[ref]
            if "image" not in stack:
                ref_line = doc.line(("archs", arch_index, "stacks", position))
                yield doc.error(
                    ("stacks", stack_index),
                    f"stack {ref!r} has no image:, but arch {arch['id']!r} (line {ref_line}) runs its stacks in containers (runtime: container); add `image: ...` to the stack or set the arch's runtime: host",
                )


def _check_coverage(doc: _Doc):
    """A model that needs a newer transformers than a stack some arch uses must be excluded there, with a reason."""
    matrix = _build(doc)
    stacks = {stack.id: stack for stack in matrix.stacks}
    model_index = {item["id"]: index for index, item in _items(doc, "models")}
    reported: set[tuple[str, str]] = set()
    for arch in matrix.archs:
        for model in matrix.models:
            needed = versions.parse(model.min_transformers)
            for stack_id in arch.stacks:
                stack = stacks[stack_id]
                if versions.parse(stack.transformers) >= needed or (model.id, stack.id) in reported:
                    continue
                expectation = first_expectation(matrix.expectations, arch, model, stack)
                if expectation is not None and expectation.outcome == "excluded":
                    continue
                reported.add((model.id, stack.id))
                cell = cell_id(arch.id, model.id, stack.id)
                if expectation is None:
                    yield doc.error(
                        ("models", model_index[model.id], "min_transformers"),
                        f"model {model.id!r} needs transformers >= {model.min_transformers}, but stack {stack.id!r} (used by arch {arch.id!r}) pins {stack.transformers} and no expectation excludes cell {cell}; "
                        f'add under expectations: `- {{outcome: excluded, models: [{model.id}], transformers: "<{model.min_transformers}", reason: "..."}}` or drop the stack from the arch',
                    )
                else:
                    yield _fail(
                        doc.path,
                        expectation.line,
                        (
                            f"this expectation marks cell {cell} as {expectation.outcome!r}, but model {model.id!r} needs transformers >= {model.min_transformers} and stack {stack.id!r} pins {stack.transformers}; "
                            f"make it `outcome: excluded` or put an excluded expectation before it"
                        ),
                    )


# --------------------------------------------------------------------------------------------- data → records


def _build(doc: _Doc) -> Matrix:
    data = doc.data

    def strings(item, key):
        return tuple(item.get(key, ()))

    archs = tuple(
        Arch(
            id=a["id"],
            vendor=a["vendor"],
            description=a["description"],
            capability=tuple(a["capability"]) if "capability" in a else None,
            gfx=a.get("gfx"),
            dtypes=strings(a, "dtypes") or Arch.dtypes,
            vision_backends=strings(a, "vision_backends") or Arch.vision_backends,
            text_backends=strings(a, "text_backends") or Arch.text_backends,
            runtime=a.get("runtime", Arch.runtime),
            stacks=strings(a, "stacks"),
            notes=strings(a, "notes"),
            no_hub_kernels=a.get("no_hub_kernels"),
        )
        for a in data["archs"]
    )
    stacks = tuple(
        Stack(
            id=s["id"],
            python=s["python"],
            torch=s["torch"],
            torch_variant=s["torch_variant"],
            transformers=s["transformers"],
            xformers=s.get("xformers"),
            flash_attn=s.get("flash_attn"),
            image=s.get("image"),
            base_image=s.get("base_image"),
            ci=s.get("ci", Stack.ci),
            notes=strings(s, "notes"),
            overrides=tuple(
                Override(package=o["package"], pin=o["pin"], install=o["install"], reason=o["reason"])
                for o in s.get("overrides", ())
            ),
        )
        for s in data["stacks"]
    )
    models = tuple(
        Model(id=m["id"], family=m["family"], description=m["description"], min_transformers=m["min_transformers"])
        for m in data["models"]
    )
    expectations = tuple(
        Expectation(
            outcome=e["outcome"],
            reason=e["reason"],
            archs=strings(e, "archs"),
            models=strings(e, "models"),
            stacks=strings(e, "stacks"),
            transformers=e.get("transformers"),
            line=doc.line(("expectations", index)),
        )
        for index, e in enumerate(data.get("expectations") or ())
    )
    extra = {k: v for k, v in data.items() if k.startswith("x-")}
    return Matrix(archs=archs, stacks=stacks, models=models, expectations=expectations, path=doc.path, extra=extra)


# --------------------------------------------------------------------------------------------- wording helpers


def _where(data: Any, path: JsonPath) -> str:
    """`'capability' of arch 'sm70'`, `'archs'`, `item 2 of 'stacks' of arch 'cpu'` ..."""
    if not path:
        return "the top level"
    if len(path) == 1:
        return repr(path[0])
    if len(path) == 2:
        return _owner(data, path)
    field_path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[2:]).lstrip(".")
    return f"{field_path!r} of {_owner(data, path)}"


def _owner(data: Any, path: JsonPath) -> str:
    """The arch/stack/model/expectation a path lies in, named by id when it has one."""
    if not path:
        return "the top level"
    section = path[0]
    if len(path) == 1 or not isinstance(path[1], int):
        return repr(section)
    kind = SECTIONS.get(section, "item")
    try:
        item = data[section][path[1]]
    except (KeyError, IndexError, TypeError):
        item = None
    if isinstance(item, dict) and isinstance(item.get("id"), str) and len(item["id"]) <= 60:
        return f"{kind} {item['id']!r}"
    return f"{section}[{path[1]}]"


def _last_key(path: JsonPath) -> str | None:
    for part in reversed(path):
        if isinstance(part, str):
            return part
    return None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _first_duplicate(items) -> Any:
    seen = []
    for item in items if isinstance(items, list) else ():
        if item in seen:
            return item
        seen.append(item)
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        bytes: "binary data",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _code(character: int | str) -> int:
    return character if isinstance(character, int) else ord(character[:1] or "\0")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return _clip(json.dumps(value, default=str, ensure_ascii=False))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 200 else f"an integer of {value.bit_length()} bits"
        return text
    return _clip(repr(value))


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(path: str, line: int | None, message: str) -> MatrixError:
    """The one error type the loader raises, its message kept to one line."""
    return MatrixError(path, line, _one_line(message))


__all__ = ["load_matrix", "parse_matrix", "schema"]
