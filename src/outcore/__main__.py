"""`python -m outcore ...`: the `outcore` command (src/outcore_main.py), for an
environment whose scripts are not on PATH."""
import sys

from outcore_main import main

sys.exit(main())
