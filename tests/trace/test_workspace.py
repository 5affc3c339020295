"""Per-op workspace from the CUDA allocator (NOTE [Workspace from the allocator] in
trace/recorder.py), checked without a GPU: the meter's arithmetic on stand-in allocator
figures, and that the recorder writes what a meter reports into the trace. The real
allocator is read by benchmarks/gpu_check.py on a GPU machine."""
import torch

import outcore
from outcore.trace import recorder


def test_the_meter_takes_the_peak_above_what_was_held_before_and_after(monkeypatch):
    figures = {"allocated": 1000, "peak": 0}

    def reset(device):
        figures["peak"] = figures["allocated"]

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: figures["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: figures["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    meter = recorder.WorkspaceMeter("cuda:0")
    meter.start()
    # The op allocates a 300-byte output, then 700 bytes of workspace, frees the workspace.
    figures["peak"], figures["allocated"] = 2000, 1300
    assert meter.bytes() == 700
    # An op that frees an input and takes no workspace reports none.
    meter.start()
    figures["allocated"] = 900
    assert meter.bytes() == 0


def test_cpu_ops_get_no_meter():
    assert recorder.workspace_meter([torch.ones(2)]) is None
    assert recorder.workspace_meter([]) is None


def test_the_recorder_writes_each_ops_workspace(monkeypatch):
    class Meter:
        def start(self):
            pass

        def bytes(self):
            return 4096

    monkeypatch.setattr(recorder, "workspace_meter", lambda inputs: Meter() if inputs else None)
    x = torch.randn(8, 8)
    with outcore.record() as rec:
        (x @ x).relu()
    fns = rec.trace.functions
    assert [f.workspace_bytes for f in fns] == [4096] * len(fns) and fns
    peak_with = rec.trace.peak(actual=True)[0]
    monkeypatch.undo()
    with outcore.record() as plain:
        (x @ x).relu()
    assert all(f.workspace_bytes == 0 for f in plain.trace.functions)
    assert peak_with == plain.trace.peak(actual=True)[0] + 4096
