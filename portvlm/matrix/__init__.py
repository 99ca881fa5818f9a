"""The support matrix: matrix.yaml → Matrix (load) → cells (expand), both pure apart from reading the file."""

from __future__ import annotations

from portvlm.matrix.expand import cells_to_json, expand, select
from portvlm.matrix.load import cli_matrix, cli_matrix_path, load_matrix, packaged_path, parse_matrix
from portvlm.matrix.schema import Arch, Cell, Expectation, Matrix, Model, Stack, cell_id

__all__ = [
    "Arch",
    "Cell",
    "Expectation",
    "Matrix",
    "Model",
    "Stack",
    "cell_id",
    "cells_to_json",
    "cli_matrix",
    "cli_matrix_path",
    "expand",
    "load_matrix",
    "packaged_path",
    "parse_matrix",
    "select",
]
