"""The machinery of flag groups: click options gathered into one decorator, and which flags the user
typed (a flag left at its default must not hide a config file's value)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast, get_args

import click
from click.core import ParameterSource

F = TypeVar("F", bound=Callable[..., Any])
TYPED_SOURCES = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def choice_option(*names: str, choices: Any, default: str, help: str) -> Callable:
    """A click option taking one value of the ``Literal`` type ``choices``, its default shown."""
    return click.option(
        *names, type=click.Choice(list(get_args(choices))), default=default, show_default=True, help=help
    )


def option_group(flags: Callable[[F], F], name: str, convert: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator adding ``flags`` (click options) to a command that receives, instead of their
    values, one keyword ``name``: ``convert(**values)``. Put ``run_reporting_errors`` above it, so a
    flag ``convert`` refuses is reported as bad input."""

    def probe() -> None: ...

    params = [param.name for param in flags(probe).__click_params__]

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {param: kwargs.pop(param) for param in params}
            return fn(*args, **kwargs, **{name: convert(**values)})

        return flags(cast(F, wrapper))

    return decorate


def stacked(*options: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator of click ``options``, shown in ``--help`` in the order given."""

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def typed_flags(values: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Values of the flags the user typed (or set through the environment), keyed by the config
    field each sets."""
    ctx = click.get_current_context()
    return {field: values[flag] for field, flag in fields.items() if ctx.get_parameter_source(flag) in TYPED_SOURCES}


def typed_params(fields: dict[str, str]) -> dict[str, Any]:
    """:func:`typed_flags` of the running command's own parameters: for flag groups whose converter
    makes a config (``reconstruct``, ``budget``) while a file section still needs the typed ones."""
    return typed_flags(click.get_current_context().params, fields)
