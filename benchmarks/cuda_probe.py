"""Does in-place eviction work on CUDA storages? (run on a machine with CUDA)

    PYTHONPATH=src python3 benchmarks/cuda_probe.py

The executor evicts a storage by copying it out and resizing it to 0 bytes, and
restores it by resizing back and copying in: every tensor, view and autograd saved
tensor keeps its identity. This checks the same on a CUDA storage with a pinned host
copy moved on a side stream, and that the memory really returns to the allocator."""
import torch

x = torch.randn(1 << 20, device="cuda", requires_grad=True)
y = (x * 2).sin()                      # saves x*2 for backward
view = y[10:20]
s = y.untyped_storage()
n = s.nbytes()
expected = y.detach().clone()
host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
side = torch.cuda.Stream()
before = torch.cuda.memory_allocated()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    host.untyped_storage().copy_(s, non_blocking=True)
done = torch.cuda.Event()
done.record(side)
done.synchronize()
s.resize_(0)
freed = before - torch.cuda.memory_allocated()
s.resize_(n)
with torch.cuda.stream(side):
    s.copy_(host.untyped_storage(), non_blocking=True)
torch.cuda.current_stream().wait_stream(side)
ok_values = torch.equal(y.detach(), expected) and torch.equal(view.detach(), expected[10:20])
y.sum().backward()
print({"bytes": n, "freed_by_resize0": freed, "values_back": ok_values,
       "backward_ran": x.grad is not None, "data_ptr_same_storage_object": y.untyped_storage()._cdata == s._cdata})
