"""The fitted CM beside the bank: a pickle to read back, and its settings as JSON for people.

The pickle is a cache keyed by the spec and bank that made it: a rerun or a finished job reads
it instead of refitting (the probe's cross-validation takes up to a minute and a half). One that
cannot be read (a newer cm-runner, a different scikit-learn) is simply fitted again.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import orjson

from runner.checkpoint import write_atomic
from runner.fit import FittedCM

FITTED_FILE = "fitted_cm.pkl"
FITTED_SUMMARY = "fitted_cm.json"


def save_fitted(directory: Path, key: str, fitted: FittedCM) -> None:
    write_atomic(directory / FITTED_FILE, pickle.dumps({"key": key, "fitted": fitted}, protocol=5))
    summary = {"key": key, "labels": fitted.labels, "settings": fitted.settings, "trust": fitted.trust_settings}
    summary["calibration"] = {"slope": fitted.calibration.slope, "intercept": fitted.calibration.intercept}
    write_atomic(directory / FITTED_SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2))


def load_fitted(directory: Path, key: str) -> FittedCM | None:
    path = directory / FITTED_FILE
    if not path.is_file():
        return None
    try:
        stored = pickle.loads(path.read_bytes())  # written by this job into its own output directory
    except Exception:  # a pickle from another version of cm-runner or scikit-learn: fit again
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("fitted"), FittedCM):
        return None
    return stored["fitted"]


def fits_on_file(directory: Path, stage_dirs: list[Path], fit_key: str | None) -> list[FittedCM] | None:
    """The stages' fits the job's shards were scored with (the manifest's ``fit_key``), if all are on file."""
    keys = (fit_key or "").split("|")
    if not fit_key or len(keys) != len(stage_dirs):
        return None
    fits = [load_fitted(place, key) for place, key in zip(stage_dirs, keys, strict=True)]
    return None if any(fitted is None for fitted in fits) else fits  # type: ignore[return-value]


def fitted_labels(directory: Path) -> list[str] | None:
    """The label set a finished job was fitted with (for checking reviewed labels), if it was."""
    path = directory / FITTED_SUMMARY
    return list(orjson.loads(path.read_bytes())["labels"]) if path.is_file() else None
