"""Fuzz the matrix loader: whatever the input, it returns a Matrix that expands, or raises the one-line MatrixError.

(a) mutations of the real matrix document (structure: drop/replace/duplicate/rename keys and items, wrong types,
bad versions, random references; text: lines dropped, duplicated, cut or spliced with YAML punctuation) and
(b) arbitrary text and bytes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portvlm.errors import MatrixError
from portvlm.matrix import cells_to_json, expand, parse_matrix

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "matrix.yaml").read_text(encoding="utf-8")
DOC = yaml.safe_load(TEXT)
LINES = TEXT.splitlines(keepends=True)

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # only writes the input; the loader under test is pure Python
PATH = "fuzz/matrix.yaml"
# `PATH:LINE: message` or `PATH: message`, on one line.
ERROR = re.compile(r"^.+:(\d+: |\s)\S[^\n]*$")

FUZZ = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _ids(section: str) -> list[str]:
    return [item["id"] for item in DOC[section]]


WORDS = [
    *_ids("archs"),
    *_ids("stacks"),
    *_ids("models"),
    "cpu",
    "nvidia",
    "amd",
    "intel",
    "host",
    "container",
    "pass",
    "xfail",
    "excluded",
    "skip",
    "float32",
    "float16",
    "bfloat16",
    "fp8",
    "eager",
    "sdpa_masked",
    "flash_attention_2",
    "torch_varlen",
    "4.57.1",
    "4.57",
    "5",
    "2.13.0",
    "latest",
    "<4.57.1",
    ">=4.50,<5",
    "~=4.5",
    "==4.*",
    "!!",
    "",
    " ",
    "3.11",
    "sm--70",
    "gfx942",
    "gfx",
    "portvlm/img:tag",
    "UPPER/Case",
    "id",
    "version",
    "stacks",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=10**30, max_value=10**40),
    st.floats(),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.lists(st.sampled_from(WORDS), max_size=4),
    st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), SCALARS, max_size=3),
)
PUNCTUATION = st.text(alphabet="-:[]{}&*!|>'\"#%@`,?~\t\n ", max_size=8) | st.sampled_from(
    ["<<: ", "*a", "&a ", "!!str ", "!tag ", "---\n", "? ", "- ", ": ", "\n  ", "\n- "]
)


def _paths(node, prefix=()):
    """Every path into the document (containers and scalars)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def _mutate_structure(data, doc) -> None:
    """Apply one random edit to `doc` in place."""
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths), label="path")
    target = _get(doc, path)
    parent = _get(doc, path[:-1]) if path else None
    action = data.draw(
        st.sampled_from(["delete", "replace", "duplicate", "rename", "add", "reference"]), label="action"
    )
    if action == "delete" and path:
        del parent[path[-1]]
    elif action == "replace":
        value = data.draw(VALUES, label="value")
        if path:
            parent[path[-1]] = value
        else:
            doc.clear()
            doc["version"] = value
    elif action == "duplicate" and isinstance(target, list) and target:
        target.append(copy.deepcopy(data.draw(st.sampled_from(target), label="item")))
    elif action == "rename" and isinstance(parent, dict):
        new = data.draw(st.sampled_from(WORDS) | st.text(max_size=8), label="key")
        parent[new] = parent.pop(path[-1])
    elif action == "add" and isinstance(target, dict):
        target[data.draw(st.sampled_from(WORDS), label="key")] = data.draw(VALUES, label="value")
    elif action == "add" and isinstance(target, list):
        target.insert(data.draw(st.integers(0, len(target))), data.draw(VALUES, label="value"))
    elif path:  # "reference" (and the fall-through of the others): point at some id, declared or not
        parent[path[-1]] = data.draw(st.sampled_from(WORDS), label="reference")


def _mutate_text(data) -> str:
    """Drop, duplicate, cut or splice a few lines of the real file."""
    lines = list(LINES)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if not lines:
            break
        index = data.draw(st.integers(0, len(lines) - 1), label="line")
        action = data.draw(st.sampled_from(["drop", "duplicate", "cut", "splice", "indent"]), label="text action")
        if action == "drop":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif action == "cut":
            line = lines[index]
            lines[index] = line[: data.draw(st.integers(0, len(line)), label="cut at")] + "\n"
        elif action == "splice":
            line = lines[index]
            at = data.draw(st.integers(0, len(line)), label="splice at")
            lines[index] = line[:at] + data.draw(PUNCTUATION | st.sampled_from(WORDS), label="insert") + line[at:]
        else:
            lines[index] = data.draw(st.sampled_from(["", " ", "  ", "\t", "    "]), label="indent") + lines[
                index
            ].lstrip(" ")
    return "".join(lines)


def _check(source: str | bytes) -> None:
    """Loading `source` gives a usable Matrix or one clean MatrixError, nothing else."""
    try:
        matrix = parse_matrix(source, PATH)
    except MatrixError as err:
        text = str(err)
        assert ERROR.match(text), text
        assert "\n" not in text and err.path == PATH and err.message.strip(), text
        assert "report this message" not in text, f"no specific message for this input: {text}"
        newline = b"\n" if isinstance(source, bytes) else "\n"
        assert err.line is None or 1 <= err.line <= source.count(newline) + 1, text
        return
    # Accepted: it must expand and serialise (the loader vouches for every reference and version).
    json.dumps(cells_to_json(expand(matrix)))


@FUZZ
@given(st.data())
def test_mutated_matrix_loads_or_fails_cleanly(data):
    if data.draw(st.booleans(), label="structural"):
        doc = copy.deepcopy(DOC)
        for _ in range(data.draw(st.integers(1, 4), label="mutations")):
            _mutate_structure(data, doc)
        source = yaml.dump(doc, Dumper=DUMPER, sort_keys=False, allow_unicode=True)
    else:
        source = _mutate_text(data)
    _check(source)


@FUZZ
@given(
    st.one_of(
        st.text(),
        st.binary(),
        st.lists(PUNCTUATION | st.sampled_from(WORDS), max_size=30).map("".join),
        st.lists(PUNCTUATION | st.sampled_from(WORDS), max_size=30).map(lambda parts: "version: 1\n" + "".join(parts)),
    )
)
def test_arbitrary_input_loads_or_fails_cleanly(source):
    _check(source)
