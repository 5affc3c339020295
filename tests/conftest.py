import os

import torch

# Keep runs deterministic and cheap on the 2-core machines CI uses.
torch.set_num_threads(min(2, os.cpu_count() or 1))
