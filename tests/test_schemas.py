from pathlib import Path

import orjson
import yaml

from runner.schemas import SCHEMA_MODELS, check_schemas, render_schema

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_schema_files_match_the_models():
    assert check_schemas(SCHEMAS) == [], "schemas/ is stale: run `cm-run schemas`"


def test_schemas_describe_the_formats():
    job = orjson.loads(render_schema(SCHEMA_MODELS["job-spec.schema.json"]))
    assert set(job["required"]) == {"name", "dataset", "user_split", "corpus", "output"}
    assert job["additionalProperties"] is False
    bank = orjson.loads((SCHEMAS / "memory-bank.schema.json").read_bytes())
    assert {"labels", "model", "strategy", "confusions", "user_split"} <= set(bank["properties"])


def test_shipped_specs_use_only_schema_keys():
    """Every top-level key the job files use is a property of the job schema (bases included)."""
    job = orjson.loads((SCHEMAS / "job-spec.schema.json").read_bytes())
    allowed = set(job["properties"]) | {"base"}
    for path in (SCHEMAS.parent / "jobs").rglob("*.yaml"):
        assert set(yaml.safe_load(path.read_text())) <= allowed, path
