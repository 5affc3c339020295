"""`outcore bench`: outcore side by side with what users run today, each run in a fresh
process. variants.py sets up the alternatives (checkpointing, offload hooks), child.py
runs one config, runner.py runs many with a progress bar, experiments.py defines the
experiments, output.py writes markdown, JSON and PNG."""
