"""JSON Schemas of the file formats, generated from the pydantic models that read them."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from runner.bank import MemoryBank
from runner.checkpoint import Manifest
from runner.evaluate import GridSpec
from runner.spec import JobSpec

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "job-spec.schema.json": JobSpec,
    "memory-bank.schema.json": MemoryBank,
    "manifest.schema.json": Manifest,
    "eval-grid.schema.json": GridSpec,
}


def render_schema(model: type[BaseModel]) -> bytes:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **model.model_json_schema(),
    }
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMA_MODELS.items():
        path = directory / name
        path.write_bytes(render_schema(model))
        written.append(path)
    return written


def check_schemas(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    return [
        name
        for name, model in SCHEMA_MODELS.items()
        if not (directory / name).is_file() or (directory / name).read_bytes() != render_schema(model)
    ]
