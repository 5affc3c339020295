"""NOTE [Loaded by mapping] in run/mapped.py: weights that lie in a private mapping of
their file (transformers' `from_pretrained`, `torch.load(mmap=True)` loaded with
`assign=True`), named by `make_movable(model, ooc)`, get memory of their own when the
step first uses them and move like any, bitwise; views of the file taken elsewhere keep
the bytes as loaded. Unnamed, such storages, shared mappings and numpy's heap memory
stay as they are, aliased."""
from __future__ import annotations

import logging
import mmap

import numpy as np
import pytest
import torch

import outcore
from outcore.errors import OutcoreError
from outcore.integrations import make_movable
from outcore.run.mapped import in_private_file_mappings

from ..trace.helpers import assert_bitwise_equal, state_of

WIDTH, DEPTH, BUDGET = 512, 4, 12 * 2**20     # parameters 4 MiB, Adam's moments 8 MiB


def make():
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def step(model, opt, it):
    g = torch.Generator().manual_seed(it)
    x = torch.randn(64, WIDTH, generator=g)
    (model(x) - x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _resident_of(path) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                current = parts[5] if len(parts) > 5 else None
            elif parts[0] == "Rss:" and current == str(path):
                total += int(parts[1]) * 1024
    return total


def _mapped_model(path):
    """The model with its weights in a private mapping of `path` (torch.load(mmap=True),
    assign=True: the storages are the file's pages, not copies)."""
    model = make()
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    return model


def test_weights_loaded_by_mapping_move_and_train_bitwise(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(make().state_dict(), path)
    plain = _mapped_model(path)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    for it in range(5):
        step(plain, plain_opt, it)
    expected = state_of(plain, plain_opt)
    del plain, plain_opt                # its mapping of the file: gone with it
    model = _mapped_model(path)
    assert not any(p.untyped_storage().resizable() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        assert make_movable(model, ooc) == DEPTH       # the weights (biases: under
        for it in range(5):                             # min_move_bytes, pinned anyway)
            with ooc.iteration():
                step(model, opt, it)
        entries = [ooc._res.entry_of(layer.weight.untyped_storage()) for layer in model[::2]]
        assert all(e is not None and not e.pinned for e in entries)
        report = ooc.report()
        # helper-164: the mappings given up kept the whole file resident beside the
        # budget (clean pages the kernel reclaims only under pressure): paged out now.
        assert _resident_of(path) < 2**20 <= 4 * WIDTH * WIDTH
    assert_bitwise_equal(state_of(model, opt), expected)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= BUDGET for it in replays), report
    assert sum(it.bytes_read for it in replays) > 0
    assert list(swap.iterdir()) == []
    assert torch.equal(torch.load(path, weights_only=True)["0.weight"], make()[0].weight)


def test_a_model_from_pretrained_trains_below_its_weights(tmp_path):
    """helper-147: transformers 5's `from_pretrained` maps the safetensors file; its 27
    MiB of weights never moved, and a budget its copy built from the config trained at
    was refused (InfeasibleBudget)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "pretrained")

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained",
                                                                 dtype=torch.float32)

    def train(model, ooc=None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randint(0, 8000, (4, 48), generator=g)
            with ooc.iteration() if ooc is not None else torch.enable_grad():
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
        return state_of(model, opt)
    expected = train(load())
    weights = sum(p.nbytes for p in load().parameters())
    budget = 24 * 2**20
    assert weights > budget
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        model = load()
        assert not any(p.untyped_storage().resizable() for p in model.parameters())
        assert make_movable(model, ooc) > 0
        assert_bitwise_equal(train(model, ooc), expected)
        replays = [it for it in ooc.report().iterations if it.mode == "replay"]
        assert replays and all(it.peak_resident <= budget for it in replays)


def test_shared_mappings_and_numpy_memory_stay_aliased(tmp_path):
    """A weight over an np.memmap opened for writing (a shared mapping: its writes reach
    the file) and one over a numpy array keep their memory: both arrays see every update,
    as without outcore."""
    def aliased(model):
        memmap = np.memmap(tmp_path / f"w{len(list(tmp_path.iterdir()))}.bin", np.float32,
                           "w+", shape=(WIDTH, WIDTH))
        memmap[:] = model[0].weight.detach().numpy()
        heap = model[2].weight.detach().numpy().copy()
        model[0].weight = torch.nn.Parameter(torch.from_numpy(memmap))
        model[2].weight = torch.nn.Parameter(torch.from_numpy(heap))
        return model, memmap, heap
    plain, _, _ = aliased(make())
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    for it in range(4):
        step(plain, plain_opt, it)
    model, memmap, heap = aliased(make())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        for it in range(4):
            with ooc.iteration():
                step(model, opt, it)
        for p in (model[0].weight, model[2].weight):
            assert ooc._res.entry_of(p.untyped_storage()).pinned
    assert_bitwise_equal(state_of(model, opt), state_of(plain, plain_opt))
    assert np.array_equal(memmap, model[0].weight.detach().numpy())
    assert np.array_equal(heap, model[2].weight.detach().numpy())
    assert np.array_equal(np.fromfile(memmap.filename, np.float32).reshape(WIDTH, WIDTH),
                          model[0].weight.detach().numpy())       # written through


def test_make_movable_after_the_model_ran_is_refused_naming_a_new_outofcore(tmp_path, caplog):
    """helper-164: an iteration raised InfeasibleBudget (its advice names make_movable),
    the user called make_movable then: it took only the weights the iteration had not
    reached, the others stayed pinned as loaded, and every later iteration raised again.
    Refused now, nothing named; a new OutOfCore takes them all."""
    path = tmp_path / "weights.pt"
    torch.save(make().state_dict(), path)
    model = _mapped_model(path)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(64 * 2**20, swap_dir=str(swap)) as ooc:
        with ooc.iteration():
            step(model, opt, 0)
        with pytest.raises(OutcoreError, match=rf"make_movable\(model, ooc\): {DEPTH} of the "
                           r"model's weights loaded by mapping \(4.00 MiB: 0.weight, 2.weight, "
                           r"4.weight, ...\) were used by an iteration of this OutOfCore "
                           r"already.* Close it, make a new OutOfCore"):
            make_movable(model, ooc)
        assert not ooc._res.adoptable
        with caplog.at_level(logging.WARNING, logger="outcore"):     # as the callbacks call it
            assert make_movable(model, ooc, refuse=False) == 0
        assert [r.getMessage().endswith("the others move") for r in caplog.records] == [True]
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        assert make_movable(model, ooc) == DEPTH


def _from_file_model(directory, shared):
    """The model with each weight over `UntypedStorage.from_file(..., shared)` of a file
    holding its initial bytes (a private mapping where not `shared`)."""
    model = make()
    for k, layer in enumerate(model[::2]):
        path = directory / f"w{k}.bin"
        layer.weight.detach().numpy().tofile(path)
        storage = torch.UntypedStorage.from_file(str(path), shared, layer.weight.nbytes)
        weight = torch.empty(0).set_(storage).view(WIDTH, WIDTH)
        layer.weight = torch.nn.Parameter(weight)
    return model


def test_weights_over_a_private_from_file_mapping_move_and_train_bitwise(tmp_path):
    """`UntypedStorage.from_file(shared=False)` maps the file privately but says
    is_shared(), and make_movable skipped such weights (0 taken: every weight pinned in
    RAM). Taken now; the files are never written."""
    plain = make()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    for it in range(4):
        step(plain, plain_opt, it)
    model = _from_file_model(tmp_path, shared=False)
    assert model[0].weight.untyped_storage().is_shared()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        assert make_movable(model, ooc) == DEPTH
        for it in range(4):
            with ooc.iteration():
                step(model, opt, it)
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), state_of(plain, plain_opt))
    assert sum(it.bytes_read for it in report.iterations if it.mode == "replay") > 0
    for k, layer in enumerate(make()[::2]):
        on_disk = np.fromfile(tmp_path / f"w{k}.bin", np.float32).reshape(WIDTH, WIDTH)
        assert np.array_equal(on_disk, layer.weight.detach().numpy())


def test_weights_over_a_shared_from_file_mapping_are_not_taken(tmp_path):
    """`from_file(shared=True)` writes reach the file: make_movable leaves them there."""
    model = _from_file_model(tmp_path, shared=True)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        assert make_movable(model, ooc) == 0


def test_only_private_mappings_of_files_are_taken_for_loaded_weights(tmp_path):
    path = tmp_path / "a.bin"
    np.arange(4 * mmap.PAGESIZE, dtype=np.uint8).tofile(path)

    def covered(t):
        storage = t.untyped_storage()
        return in_private_file_mappings(storage.data_ptr(), storage.nbytes())
    assert covered(torch.from_numpy(np.memmap(path, np.uint8, "c")))          # copy-on-write
    assert not covered(torch.from_numpy(np.memmap(path, np.uint8, "r+")))     # shared
    assert not covered(torch.from_numpy(np.zeros(4 * mmap.PAGESIZE, np.uint8)))  # heap
    assert not covered(torch.zeros(2**20))
    torch.save(torch.zeros(2**20), tmp_path / "t.pt")
    assert covered(torch.load(tmp_path / "t.pt", mmap=True, weights_only=True))


def test_unnamed_mapped_weights_stay_pinned_and_a_view_taken_before_stays_valid(tmp_path):
    """helper-151: given memory of their own on first sight, weights loaded by mapping
    let go of the mapping a numpy array taken before the OutOfCore read (a segmentation
    fault), and stopped aliasing a copy-on-write np.memmap under them. Unnamed they stay
    as they are; named, the array keeps reading the bytes as loaded. In a child: the
    failure was a crash."""
    child = f"""
import numpy as np, torch, outcore
from outcore.integrations import make_movable
torch.save({{"w": torch.ones(512, 512)}}, {str(tmp_path / "w.pt")!r})
for named in (False, True):
    w = torch.load({str(tmp_path / "w.pt")!r}, mmap=True, weights_only=True)["w"]
    arr = w.numpy()
    with outcore.OutOfCore(10 * 2**20, swap_dir={str(tmp_path)!r}) as ooc:
        holder = torch.nn.Module()
        holder.w = torch.nn.Parameter(w, requires_grad=False)
        if named:
            assert make_movable(holder, ooc) == 1
        for _ in range(2):          # 13 MiB at the peak (w 1, a, b, c 4 each): 10 is below
            with ooc.iteration():
                w.mul_(2)
                a, b = torch.ones(1024, 1024), torch.ones(1024, 1024)
                c = b * 2
                (a.sum() + c.sum() + w.sum()).item()
        pinned = ooc._res.entry_of(w.untyped_storage()).pinned
    print("NAMED", named, "PINNED", pinned, "ARRAY", float(arr[0, 0]), "W", float(w[0, 0]))
"""
    from .. import zygote
    out = zygote.run(["-c", child], timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "NAMED False PINNED True ARRAY 4.0 W 4.0" in out.stdout, out.stdout   # aliased
    assert "NAMED True PINNED False ARRAY 1.0 W 4.0" in out.stdout, out.stdout   # as loaded


def test_two_storages_over_the_same_mapped_bytes_are_refused(tmp_path):
    """helper-151: safetensors' `get_tensor` twice gives two storages over the same
    bytes, which share every write in plain PyTorch; a copy for each would part them."""
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.ones(256, 256)}, str(tmp_path / "w.safetensors"))
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        a, b = f.get_tensor("w"), f.get_tensor("w")
    assert a.untyped_storage()._cdata != b.untyped_storage()._cdata
    assert a.data_ptr() == b.data_ptr()
    holder = torch.nn.Module()
    holder.a, holder.b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    swap = tmp_path / "swap"
    swap.mkdir()
    with outcore.OutOfCore(BUDGET, swap_dir=str(swap)) as ooc:
        with pytest.raises(OutcoreError, match="a and b lie over the same bytes of a mapped "
                                               "file in two storages.*Nothing was changed"):
            make_movable(holder, ooc)
        assert ooc._res.adoptable == {}
