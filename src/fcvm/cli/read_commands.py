"""The read commands (`fcvm ls`, `inspect`, `logs`), declared as data.

They run most often, from scripts and in loops, and their argv is nearly always plain: each word one of their
flags or a positional. Such an argv is parsed here, without argparse, which would cost `fcvm ls` about a fifth of
its start (argparse itself, and shutil and locale for its help formatter and messages). Every other argv (`--help`,
an abbreviated flag, a global option first, a mistake) goes to the argparse CLI (cli/parser.py), which builds these
commands from the same declarations, so their help and errors are argparse's.
"""

from __future__ import annotations

from types import SimpleNamespace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


class ReadCommand:
    """A command whose arguments are positionals (one word each) and flags (each on or off)."""

    __slots__ = ("flags", "handler", "help_text", "name", "positionals")

    def __init__(self, name: str, help_text: str, handler: str, *, positionals: tuple[str, ...] = (),
                 flags: tuple[tuple[str, tuple[str, ...], str], ...] = ()) -> None:
        """`handler` is "module:function" in fcvm.commands; each flag is (dest, option strings, help)."""
        self.name = name
        self.help_text = help_text
        self.handler = handler
        self.positionals = positionals
        self.flags = flags

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        parser = sub.add_parser(self.name, help=self.help_text)
        for positional in self.positionals:
            parser.add_argument(positional)
        for dest, options, help_text in self.flags:
            parser.add_argument(*options, dest=dest, action="store_true", help=help_text)
        parser.set_defaults(handler=self.handler)

    def parse(self, words: Sequence[str]) -> SimpleNamespace | None:
        """The arguments after the command's name, as argparse gives them, when every word is one of the flags or
        a positional that does not start with "-"; None for argparse to parse (and explain) all else."""
        dests = {option: dest for dest, options, _ in self.flags for option in options}
        values: dict[str, object] = {dest: False for dest, _, _ in self.flags}
        given: list[str] = []
        for word in words:
            if word in dests:
                values[dests[word]] = True
            elif word.startswith("-"):
                return None
            else:
                given.append(word)
        if len(given) != len(self.positionals):
            return None
        values.update(zip(self.positionals, given, strict=True))
        return SimpleNamespace(log_level=None, handler=self.handler, **values)


READ_COMMANDS = {
    command.name: command
    for command in (
        ReadCommand("ls", "list VMs", "ls:run", flags=(
            ("all", ("-a", "--all"), "include exited VMs"),
            ("json", ("--json",), "print JSON"),
        )),
        ReadCommand("inspect", "show everything fcvm knows about a VM", "inspect:run", positionals=("name",)),
        ReadCommand("logs", "show a VM's console and container output", "logs:run", positionals=("name",), flags=(
            ("follow", ("-f", "--follow"), "keep printing new output"),
            ("console", ("--console",), "the VM's serial console instead"),
        )),
    )
}
