"""Read a YAML or TOML config file into plain data, with the file's position in every parse error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfq_deploy.errors import BadInputError


def parse_config_file(path: str | Path) -> Any:
    """The file's data (YAML, or TOML for ``.toml``); a missing, non-UTF-8 or malformed file is a
    :class:`BadInputError` saying where."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"config file {path} is not UTF-8 text (byte {exc.start})", hint="save it as UTF-8 YAML or TOML"
        ) from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # Python 3.11/3.12 put the position only in the message: "Invalid value (at line 2, column 5)".
            raise BadInputError(
                f"config file {path} is not valid TOML: {exc}",
                hint="fix the file at that line and column (TOML: key = value under [section])",
            ) from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInputError(
            f"config file {path} is not valid YAML{where}: {problem}",
            hint="fix the file there (YAML: `section:` then indented `key: value` lines)",
        ) from None
