"""`outcore <command>`: dispatch to one module per subcommand.

Each module `outcore.cli.<name>_cmd` defines `add_parser(subparsers)` (which sets
`func` on its parser) and keeps its own logic.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import OutcoreError

# Subcommands in the order `outcore --help` lists them.
COMMANDS = ("demo", "trace", "plan", "simulate", "plot", "report", "state", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outcore",
        description="Train PyTorch networks larger than the memory they run in: record one "
                    "iteration, plan when each tensor moves, simulate, and replay the plan.")
    from .. import __version__
    parser.add_argument("--version", action="version",
                        version=f"outcore {__version__} (Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"outcore.cli.{name}_cmd").add_parser(sub)
    return parser


def _negative_values_joined(argv: list) -> list:
    """`--budget -5MiB` as `--budget=-5MiB`: argparse takes a value that starts with '-'
    and is no plain number for an option, and says only "expected one argument"; joined,
    the option's own check says what is wrong with the value."""
    out = []
    for arg in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1]
                and len(arg) > 1 and arg[0] == "-" and (arg[1].isdigit() or arg[1] == ".")):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_negative_values_joined(argv))
    args.argv = argv          # for results that record the command that made them
    try:
        return args.func(args) or 0
    except OutcoreError as exc:
        print(f"outcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `outcore report ... | head`: the reader is gone
        try:
            sys.stdout = open(os.devnull, "w")     # nothing more to say; no error at exit
        except OSError:
            pass
        return 0
    except OSError as exc:           # a path the user gave: missing, a directory, full disk
        message = exc.strerror or str(exc)
        if exc.filename is not None and os.fspath(exc.filename) not in message:
            message += f": {os.fspath(exc.filename)}"
        print(f"outcore: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
