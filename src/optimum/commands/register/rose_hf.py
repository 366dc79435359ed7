"""``optimum-cli rose prune|eval|inspect``: rose_hf's commands inside optimum's CLI.

optimum-cli imports every module of the ``optimum.commands.register`` namespace package and
registers the commands in its ``REGISTER_COMMANDS``. This file is rose_hf's part of that namespace
(PEP 420: no ``__init__.py`` above it). The parser is ``rose-hf``'s own, so both CLIs take the
same flags; importing this module imports nothing heavy.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class RoseCommand(BaseOptimumCLICommand):
    """The ``rose`` command: the ``rose-hf`` commands under optimum-cli."""

    COMMAND = CommandInfo(name="rose", help="one-shot ROSE / SparseGPT pruning with rose_hf (prune, eval, inspect)")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        from rose_hf.cli_parser import add_commands

        add_commands(parser, parser_class=ArgumentParser)

    def run(self) -> None:
        from rose_hf.cli import run_parsed

        code = run_parsed(self.args)
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [RoseCommand]
