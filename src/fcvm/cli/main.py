"""`fcvm`: argv -> the command's handler. Each command names its handler as "module:function" in fcvm.commands,
imported lazily, so `fcvm --help` and `fcvm ls` never pay for httpx, rich tables or pyroute2; and a read command's
plain argv is parsed without argparse (cli/read_commands.py)."""

from __future__ import annotations

import sys

from fcvm.cli.read_commands import READ_COMMANDS
from fcvm.core import log
from fcvm.core.errors import FcvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from types import SimpleNamespace

    # What a handler is given: argparse's namespace, or a read command's plain parse (attributes alike).
    Handler = Callable[[argparse.Namespace | SimpleNamespace], int | None]


def _load(module_name: str, function_name: str) -> Handler:
    # __import__, not importlib.import_module: the importlib package would cost every command 0.4 ms.
    module = __import__(f"fcvm.commands.{module_name}", fromlist=[function_name])
    handler: Handler = getattr(module, function_name)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    read_command = READ_COMMANDS.get(words[0]) if words else None
    args: argparse.Namespace | SimpleNamespace | None = read_command.parse(words[1:]) if read_command else None
    if args is None:
        from fcvm.cli.parser import parse

        args = parse(words)
    try:
        log.setup(args.log_level)
    except ValueError as exc:
        from fcvm.cli.parser import usage_error

        usage_error(str(exc))
    if args.handler is None:
        args.group_parser.print_help(sys.stderr)
        return 2
    module_name, function_name = args.handler.split(":")
    try:
        result: int | None = _load(module_name, function_name)(args)
    except FcvmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return result or 0
