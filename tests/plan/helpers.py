"""Hand-built Traces for planner and simulator tests (no torch state involved).

`build` reads a small text form a reader can check by eye:

    build({"x": (8, "input"), "w": (4, "param"), "h": 8, "y": 8},
          ["fwd  r:x r:w c:h",
           "act  r:h c:y"])

Array specs: an int is a transient of that many bytes; (nbytes, "input") existed before
and is only read; (nbytes, "param") is persistent and existed before; (nbytes, "state")
is persistent and created inside the step. Each function line is `op access...`, with
access `r:`, `w:` or `c:` (read, write, create) and an optional `@phase` token (default
forward). Array ids follow the dict's order.

`held` gives `freed_after` for non-persistent arrays whose storage outlives their last
use ({"g": 5}: PyTorch drops it after function 5; {"x": None}: alive at the end of the
step). Every other non-persistent array is freed right after its last use.
`workspace` gives functions' workspace bytes ({2: 16}: function 2 takes 16 B while it
runs).
"""
from __future__ import annotations

from hypothesis import strategies as st

from outcore.trace.model import Access, Array, Function, Trace

_KINDS = {"input": ("input", True, "input"), "param": ("persistent", True, "parameter"),
          "state": ("persistent", False, "optimizer_state")}
_ACC = {"r": "read", "w": "write", "c": "create"}


def build(arrays: dict, functions: list[str], *, durations=None, flops=None, touched=None,
          held=None, workspace=None) -> Trace:
    names = list(arrays)
    ids = {name: i for i, name in enumerate(names)}
    fns, uses = [], {i: [] for i in range(len(names))}
    for index, line in enumerate(functions):
        op, *tokens = line.split()
        phase = "forward"
        accesses = []
        for tok in tokens:
            if tok.startswith("@"):
                phase = tok[1:]
                continue
            code, name = tok.split(":")
            accesses.append(Access(ids[name], _ACC[code]))
            uses[ids[name]].append((index, len(accesses) - 1))
        fns.append(Function(index=index, op=op, phase=phase, accesses=tuple(accesses),
                            duration_s=durations[index] if durations else 1e-3,
                            flops=flops[index] if flops else 0,
                            bytes_touched=touched[index] if touched else 0,
                            workspace_bytes=(workspace or {}).get(index, 0)))
    return _assemble(names, arrays, fns, uses, held or {})


def _assemble(names, arrays, fns, uses, held) -> Trace:
    out = []
    for i, name in enumerate(names):
        spec = arrays[name]
        if isinstance(spec, int):
            nbytes, (kind, before, category) = spec, ("transient", False, "activation")
        else:
            nbytes, (kind, before, category) = spec[0], _KINDS[spec[1]]
        if not uses[i]:
            raise ValueError(f"array {name} is never used")
        first, last = uses[i][0][0], uses[i][-1][0]
        freed = None if kind == "persistent" else held.get(name, last)
        if freed is not None and freed < last:
            raise ValueError(f"array {name}: freed_after {freed} before its last use {last}")
        out.append(Array(id=i, nbytes=nbytes, dtype="float32", device="cpu", kind=kind,
                         category=category, origin=uses[i][0], first_use=first, last_use=last,
                         freed_after=freed,
                         existed_before=before))
    return Trace(functions=tuple(fns), arrays=tuple(out), device="cpu", durations="measured")


@st.composite
def traces(draw, max_functions: int = 24):
    """Random but well-formed traces: params and inputs that exist before the step,
    transients created by one function and read or written by later ones, and a few
    arrays created inside that must outlive the step."""
    n_params = draw(st.integers(0, 3))
    n_inputs = draw(st.integers(0, 2))
    size = st.integers(1, 64)
    arrays = {}
    for p in range(n_params):
        arrays[f"p{p}"] = (draw(size), "param")
    for x in range(n_inputs):
        arrays[f"x{x}"] = (draw(size), "input")
    n = draw(st.integers(1, max_functions))
    lines = []
    made = 0
    for i in range(n):
        pool = list(arrays)
        toks = []
        if pool:
            chosen = draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))
            for name in chosen:
                spec = arrays[name]
                readonly = isinstance(spec, tuple) and spec[1] == "input"
                code = "r" if readonly else draw(st.sampled_from("rrw"))
                toks.append(f"{code}:{name}")
        for _ in range(draw(st.integers(0 if toks else 1, 2))):
            name = f"t{made}"
            made += 1
            arrays[name] = (draw(size), "state") if draw(st.integers(0, 9)) == 0 else draw(size)
            toks.append(f"c:{name}")
        phase = ("forward", "backward", "optimizer")[min(2, 3 * i // n)]
        lines.append(f"op{i} @{phase} " + " ".join(toks))
    used = {tok.split(":")[1] for line in lines for tok in line.split()[2:]}
    arrays = {k: v for k, v in arrays.items() if k in used}
    # Release points: most storages die at their last use; some are held longer (a
    # gradient until zero_grad); an input may be held by the caller past the step (None).
    last = {}
    for i, line in enumerate(lines):
        for tok in line.split()[2:]:
            last[tok.split(":")[1]] = i
    held = {}
    for name, spec in arrays.items():
        kind = "transient" if isinstance(spec, int) else spec[1]
        if kind in ("param", "state"):
            continue
        choice = draw(st.sampled_from(("last", "last", "later", "none" if kind == "input" else "later")))
        if choice == "later":
            held[name] = draw(st.integers(last[name], n - 1))
        elif choice == "none":
            held[name] = None
    # A few functions take workspace (a library's scratch) beside their operands.
    workspace = {i: draw(size) for i in range(n) if draw(st.integers(0, 5)) == 0}
    return build(arrays, lines, held=held, workspace=workspace)
