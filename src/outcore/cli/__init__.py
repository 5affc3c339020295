"""The `outcore` command line: one module per subcommand."""
from __future__ import annotations

import os

from ..errors import OutcoreError


def check_output(path: str, flag: str) -> None:
    """A file the command will write (`flag` names its option), checked before the work
    (minutes for a big model's recording or planning), not only when it is written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        why = "is a directory"
    elif not os.path.exists(parent):
        why = f"cannot be made: the directory {parent} does not exist"
    elif not os.path.isdir(parent):
        why = f"cannot be made: {parent} is a file, not a directory"
    elif not os.access(parent, os.W_OK):
        why = f"cannot be made: {parent} is not writable"
    else:
        return
    raise OutcoreError(f"{flag} {path} {why}; pass a file path in a directory you can write to")
