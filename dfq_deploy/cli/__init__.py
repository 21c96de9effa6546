"""The `dfq-deploy` command line: parses flags into configs and calls `dfq_deploy.api`."""

from dfq_deploy.cli.commands import main

__all__ = ["main"]
