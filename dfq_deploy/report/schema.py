"""The JSON Schema of report.json: the contract a pipeline reading ``--json`` or report.json relies on."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from dfq_deploy.errors import MissingDependencyError

# Raised when a key the schema lists is removed or changes type; new keys do not raise it.
SCHEMA_VERSION = 1


@functools.cache
def report_schema() -> dict[str, Any]:
    """The schema (draft 2020-12) shipped in the package as ``report_schema.json``."""
    return json.loads(resources.files("dfq_deploy.report").joinpath("report_schema.json").read_text())


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` where ``report`` breaks the schema (needs ``jsonschema``)."""
    try:
        import jsonschema
    except ImportError:
        raise MissingDependencyError("jsonschema", extra="test", purpose="validating report.json") from None
    jsonschema.Draft202012Validator(report_schema()).validate(report)
