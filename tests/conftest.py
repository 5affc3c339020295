import gc
import os
import signal

import torch

# Keep runs deterministic and cheap on the 2-core machines CI uses: one thread per
# process, as `make test`'s two pytest workers had. A file run alone got two, and plain
# PyTorch on two threads under load differs from itself (helper-184: a shared-memory model
# trained twice without outcore differed in 1 of 6 pairs; the bitwise tests compare with
# it, and failed so in 3 of 6 runs of test_unmovable.py).
torch.set_num_threads(1)

# A shell started in the background without job control hands its children SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: every Ctrl-C test
# would fail without telling why. The tests press Ctrl-C on purpose; give them Python's.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_finish(session):
    """Once every test module is imported (torch, transformers, lightning, hypothesis:
    about half a million objects that live as long as the process), move them out of
    the garbage collector's sight. A full collection then walks only what the tests
    create, which they still collect as before; the tests that call gc.collect()
    explicitly (and outcore, where it looks for an OutOfCore left unreachable) no longer
    pay ~0.2 s a call for the imports. Objects alive now are never collected; garbage
    made before this point is collected first."""
    gc.collect()
    gc.freeze()
