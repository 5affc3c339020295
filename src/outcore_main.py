"""The `outcore` command's entry point, outside the package.

Importing `outcore` imports torch: seconds in which a Ctrl-C came out as a long
traceback of the import, where a moment later it is `outcore: interrupted` (exit 130).
Here the import itself is inside the handler. Once the command is done, a late Ctrl-C
must not break the interpreter's exit ("Exception ignored in atexit callback") after
every file was written: SIGINT is ignored from then on.
"""
from __future__ import annotations

import signal
import sys


def main() -> int:
    try:
        from outcore.cli.main import main as run
    except KeyboardInterrupt:
        print("outcore: interrupted", file=sys.stderr)
        return 130
    code = run()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
