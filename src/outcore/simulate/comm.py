"""What a collective costs: the α-β (latency-bandwidth, Hockney) model of the survey.

Ben-Nun & Hoefler ("Demystifying Parallel and Distributed Deep Learning", ACM CSUR 52(4),
2019; arXiv 1802.09941; the project's seed 001) model communication as α + β·n for a
message of n bytes: α the fixed cost of one message (latency), β the time per byte
(1 / bandwidth). A collective over p ranks is a sequence of such steps; the closed forms
used here are the classic ones for the algorithms NCCL and Gloo run (Thakur, Rabenseifner
& Gropp, "Optimization of Collective Communication Operations in MPICH", IJHPCA 19(1),
2005; NCCL's own step counts in src/graph/tuning.cc; nccl-tests doc/PERFORMANCE.md for
the per-collective bus-bandwidth factors). docs/distributed.md lists them with sources.

  operation       algorithm                time (n = bytes of the full buffer)
  allreduce       ring                     2(p-1)·α + 2(p-1)/p · n·β
  allreduce       tree (pipelined,         2·log2(p)·α + 2·n·β
                  double binary)
  allgather       ring                     (p-1)·α + (p-1)/p · n_out·β
  reduce-scatter  ring                     (p-1)·α + (p-1)/p · n_in·β
  broadcast       pipelined ring / chain   (p-1)·α + n·β
  point-to-point  one message              α + n·β

Invariants every function here keeps (tests/simulate/test_comm.py): one rank costs 0;
time never decreases with more bytes, nor (for a fixed buffer) with more ranks (the
ring's bandwidth term rises towards its limit 2·n·β); everything is in seconds and bytes.

The model ignores contention (one flat ring, each rank's link the bottleneck), protocol
switching (NCCL's LL/LL128/Simple), in-network reduction, and the per-call launch cost
NCCL adds on top of the per-step latency (its `baseLat`, ~8 µs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import OutcoreError

ALGORITHMS = ("ring", "tree")
KINDS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "p2p")


@dataclass(frozen=True)
class Interconnect:
    """One link per rank: α seconds per message step, `bandwidth_Bps` bytes per second in
    each direction (β = 1 / bandwidth). `source` says where the figures come from.
    `per_kind`: (kind, α, bandwidth) for the kinds of collective measured apart (gloo's
    reduce-scatter is slower than its allgather here); the others use alpha_s and
    bandwidth_Bps."""
    name: str
    alpha_s: float
    bandwidth_Bps: float
    source: str
    per_kind: tuple[tuple[str, float, float], ...] = ()
    # CPU seconds a rank's collective threads spend per second of a collective (gloo
    # copies and reduces on the host; 0 for a GPU's NCCL): what it takes from compute on a
    # machine with no core to spare (NOTE [No core to spare] in engine.py).
    cpu_share: float = 0.0

    def __post_init__(self):
        if not (self.cpu_share >= 0 and math.isfinite(self.cpu_share)):
            raise OutcoreError(f"interconnect {self.name!r}: cpu_share must be a finite number "
                               f">= 0 (CPU seconds per second of a collective), got "
                               f"{self.cpu_share!r}")
        for entry in self.per_kind:
            if (not isinstance(entry, tuple) or len(entry) != 3 or entry[0] not in KINDS
                    or not (entry[1] >= 0 and math.isfinite(entry[1]))
                    or not (entry[2] > 0 and math.isfinite(entry[2]))):
                raise OutcoreError(f"interconnect {self.name!r}: per_kind entries are (kind, "
                                   f"alpha_s >= 0, bandwidth_Bps > 0) with kind one of "
                                   f"{', '.join(KINDS)}; got {entry!r}")
        if not (self.alpha_s >= 0 and math.isfinite(self.alpha_s)):
            raise OutcoreError(f"interconnect {self.name!r}: alpha_s must be a finite number "
                               f">= 0 seconds, got {self.alpha_s!r}")
        if not (self.bandwidth_Bps > 0 and math.isfinite(self.bandwidth_Bps)):
            raise OutcoreError(f"interconnect {self.name!r}: bandwidth_Bps must be a finite "
                               f"number > 0, got {self.bandwidth_Bps!r}")

    @property
    def beta_s_per_byte(self) -> float:
        return 1.0 / self.bandwidth_Bps

    def for_kind(self, kind: str) -> "Interconnect":
        """This link as one kind of collective sees it (its per_kind figures, if any)."""
        for k, alpha, bandwidth in self.per_kind:
            if k == kind:
                return replace(self, alpha_s=alpha, bandwidth_Bps=bandwidth, per_kind=())
        return self

    def __str__(self) -> str:
        return (f"{self.name}: α = {self.alpha_s * 1e6:.2f} µs, "
                f"{self.bandwidth_Bps / 1e9:.2f} GB/s ({self.source})")


_NCCL_TUNING = ("NVIDIA/nccl src/graph/tuning.cc @ 01afd20a77b5804e0ecf1042509dd9d20ebf9e93 "
                "(ring/Simple per-step hardware latency hwLat)")

INTERCONNECTS: dict[str, Interconnect] = {
    # This machine: two gloo processes over loopback TCP, `outcore bench comm --json`
    # (4 KiB-64 MiB, median of 5 per size, one fit per operation), three runs on
    # 2026-12-01 on the quiet machine; each figure is the median of its three. The fits are
    # poor at small messages (worst point off by 49-83%): a floor for slow links, not a
    # network. docs/distributed.md#measured-here has every figure.
    "loopback-gloo": Interconnect(
        "loopback-gloo", alpha_s=330e-6, bandwidth_Bps=2.35e9,
        source="measured here: `outcore bench comm --json`, 2026-12-01, quiet machine, "
               "median of 3 runs per operation (docs/distributed.md#measured-here)",
        per_kind=(("allgather", 331e-6, 1.27e9), ("reduce_scatter", 679e-6, 0.62e9),
                  ("p2p", 80e-6, 3.94e9)),
        # gloo's threads: 0.45-0.67 s of CPU per s of collective (the 4 operations x 3 runs
        # of `outcore bench comm`, 2026-12-01; median 0.57).
        cpu_share=0.57),
    # The same two processes while each also computes (`outcore bench comm --busy
    # --json`, three runs on 2026-12-01; each figure the median of its three), as the
    # ranks of a training step on this 2-core machine do: gloo's threads wait for a core.
    # Each run's worst fit was off by 72-77% at some size. Use it where the ranks fill
    # the cores.
    "loopback-gloo-busy": Interconnect(
        "loopback-gloo-busy", alpha_s=614e-6, bandwidth_Bps=0.92e9,
        source="measured here: `outcore bench comm --busy --json`, 2026-12-01, median of 3 "
               "runs per operation (docs/distributed.md#measured-here)",
        per_kind=(("allgather", 840e-6, 0.60e9), ("reduce_scatter", 1276e-6, 0.40e9),
                  ("p2p", 263e-6, 1.68e9)),
        # 0.25-0.36 s of CPU per s of collective (4 operations x 3 runs; median 0.31): the
        # same CPU as idle, spread over a collective twice as long.
        cpu_share=0.31),
    # NVLink 3 between A100s (DGX A100 / HGX, through NVSwitch). NCCL's tuning model caps
    # the bus bandwidth of compute capability 8.0 at 235 GB/s and charges 3.4 µs per ring
    # step over NVLink. Datasheet: 600 GB/s per GPU, both directions together (NVIDIA A100
    # Tensor Core GPU datasheet / architecture whitepaper).
    "nvlink-a100": Interconnect(
        "nvlink-a100", alpha_s=3.4e-6, bandwidth_Bps=235e9,
        source=f"{_NCCL_TUNING}: NVLink 3.4 µs, A100 busBw cap 235 GB/s; "
               "NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional"),
    # PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s per direction raw (PCI-SIG
    # PCIe 4.0 base specification); 25 GB/s is the ~80% effective rate machines.py also
    # assumes for pinned copies. NCCL charges 5.7 µs per ring step over PCI.
    "pcie4": Interconnect(
        "pcie4", alpha_s=5.7e-6, bandwidth_Bps=25e9,
        source=f"PCI-SIG PCIe 4.0 x16 (31.5 GB/s raw per direction; 25 GB/s effective assumed); "
               f"{_NCCL_TUNING}: PCI 5.7 µs"),
    # InfiniBand HDR: 200 Gb/s per port = 25 GB/s per direction (NVIDIA ConnectX-6 HDR
    # adapter datasheet; InfiniBand Trade Association roadmap). One HCA per GPU assumed.
    "infiniband-hdr": Interconnect(
        "infiniband-hdr", alpha_s=9.6e-6, bandwidth_Bps=25e9,
        source=f"NVIDIA ConnectX-6 datasheet: HDR 200 Gb/s; {_NCCL_TUNING}: NET 9.6 µs"),
    # Ethernet line rates (IEEE 802.3ba 100GBASE, 802.3by 25GBASE). NCCL's network latency is
    # the same for every transport; TCP sockets (no RDMA) are slower per message.
    "ethernet-100g": Interconnect(
        "ethernet-100g", alpha_s=9.6e-6, bandwidth_Bps=12.5e9,
        source=f"IEEE 802.3ba: 100 Gb/s line rate; {_NCCL_TUNING}: NET 9.6 µs (RDMA/RoCE)"),
    "ethernet-25g": Interconnect(
        "ethernet-25g", alpha_s=9.6e-6, bandwidth_Bps=3.125e9,
        source=f"IEEE 802.3by: 25 Gb/s line rate; {_NCCL_TUNING}: NET 9.6 µs (RDMA/RoCE)"),
}


def interconnect(name_or_link) -> Interconnect:
    """A preset by name, or an Interconnect as is."""
    if isinstance(name_or_link, Interconnect):
        return name_or_link
    try:
        return INTERCONNECTS[name_or_link]
    except (KeyError, TypeError):
        raise OutcoreError(f"unknown interconnect {name_or_link!r}; presets: "
                           f"{', '.join(INTERCONNECTS)} (or pass an "
                           "outcore.simulate.comm.Interconnect)") from None


def _check(nbytes, ranks) -> tuple[float, int]:
    # Bytes may be fractional (a per-microbatch share); ranks must be a whole count >= 1.
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise OutcoreError(f"ranks must be an integer >= 1, got {ranks!r}")
    if not (nbytes >= 0 and math.isfinite(nbytes)):
        raise OutcoreError(f"a message size must be a finite number of bytes >= 0, got {nbytes!r}")
    return float(nbytes), ranks


def allreduce_time(nbytes, ranks: int, link, algorithm: str = "ring") -> float:
    """Seconds to allreduce a buffer of `nbytes` on every rank.

    ring: reduce-scatter then allgather around the ring, 2(p-1) steps each moving n/p
    bytes: 2(p-1)·α + 2(p-1)/p·n·β (Thakur et al. 2005, §4.4; NCCL's allreduce bus
    factor 2(p-1)/p in nccl-tests doc/PERFORMANCE.md).
    tree: a pipelined reduce up and broadcast down a (double) binary tree, each of depth
    log2(p): 2·log2(p)·α + 2·n·β (Sanders, Speck & Träff, "Two-tree algorithms for full
    bandwidth broadcast, reduction and scan", Parallel Computing 35(12), 2009; NCCL 2.4's
    double binary trees). Lower latency than the ring from a few ranks on, more bandwidth
    time for any p > 1: the classic small/large message crossover."""
    n, p = _check(nbytes, ranks)
    link = interconnect(link).for_kind("allreduce")
    if p == 1:
        return 0.0
    if algorithm == "ring":
        return 2 * (p - 1) * link.alpha_s + 2 * (p - 1) / p * n / link.bandwidth_Bps
    if algorithm == "tree":
        return 2 * math.log2(p) * link.alpha_s + 2 * n / link.bandwidth_Bps
    raise OutcoreError(f"unknown allreduce algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")


def allgather_time(nbytes_out, ranks: int, link) -> float:
    """Seconds for a ring allgather whose gathered output is `nbytes_out` (each rank
    contributes nbytes_out / p): (p-1)·α + (p-1)/p·n_out·β."""
    return _ring_pass(nbytes_out, ranks, interconnect(link).for_kind("allgather"))


def reduce_scatter_time(nbytes_in, ranks: int, link) -> float:
    """Seconds for a ring reduce-scatter of an input of `nbytes_in` per rank (each keeps a
    reduced n_in / p): (p-1)·α + (p-1)/p·n_in·β. The mirror image of the allgather."""
    return _ring_pass(nbytes_in, ranks, interconnect(link).for_kind("reduce_scatter"))


def _ring_pass(nbytes, ranks, link) -> float:
    """One pass around the ring: p-1 steps of n/p bytes."""
    n, p = _check(nbytes, ranks)
    if p == 1:
        return 0.0
    return (p - 1) * link.alpha_s + (p - 1) / p * n / link.bandwidth_Bps


def broadcast_time(nbytes, ranks: int, link) -> float:
    """Seconds to broadcast `nbytes` from one rank to all, pipelined along a chain (NCCL's
    ring broadcast, bus factor 1 in nccl-tests doc/PERFORMANCE.md): (p-1)·α + n·β."""
    n, p = _check(nbytes, ranks)
    link = interconnect(link).for_kind("broadcast")
    if p == 1:
        return 0.0
    return (p - 1) * link.alpha_s + n / link.bandwidth_Bps


def p2p_time(nbytes, link) -> float:
    """Seconds to send one message of `nbytes` to one peer: α + n·β (0 for 0 bytes: nothing
    is sent)."""
    n, _ = _check(nbytes, 1)
    link = interconnect(link).for_kind("p2p")
    return 0.0 if n == 0 else link.alpha_s + n / link.bandwidth_Bps


# -- recorded ops -----------------------------------------------------------------------
# The c10d ops a trace of one rank under torchrun holds (`outcore.record` sees them as
# dispatcher ops: docs/distributed.md#recorded-collectives), and the functional
# collectives torch.compile and FSDP2/DTensor issue. Each maps to a model above and to
# how its buffer size is read from the arrays the op touched.
_ALLREDUCE = {"c10d.allreduce_", "c10d.allreduce_coalesced_", "_c10d_functional.all_reduce",
              "_c10d_functional.all_reduce_", "_c10d_functional.all_reduce_coalesced",
              "_c10d_functional.all_reduce_coalesced_"}
_ALLGATHER = {"c10d._allgather_base_", "c10d.allgather_", "c10d.allgather_into_tensor_coalesced_",
              "c10d.allgather_coalesced_", "_c10d_functional.all_gather_into_tensor",
              "_c10d_functional.all_gather_into_tensor_out",
              "_c10d_functional.all_gather_into_tensor_coalesced"}
_REDUCE_SCATTER = {"c10d._reduce_scatter_base_", "c10d.reduce_scatter_",
                   "c10d.reduce_scatter_tensor_coalesced_",
                   "_c10d_functional.reduce_scatter_tensor",
                   "_c10d_functional.reduce_scatter_tensor_coalesced"}
_BROADCAST = {"c10d.broadcast_", "_c10d_functional.broadcast", "_c10d_functional.broadcast_"}
_P2P = {"c10d.send", "c10d.recv_", "c10d.recv_any_source_"}
_KINDS = {**{n: "allreduce" for n in _ALLREDUCE}, **{n: "allgather" for n in _ALLGATHER},
          **{n: "reduce_scatter" for n in _REDUCE_SCATTER}, **{n: "broadcast" for n in _BROADCAST},
          **{n: "p2p" for n in _P2P}}


def collective_kind(op_name: str) -> str | None:
    """"allreduce", "allgather", "reduce_scatter", "broadcast", "p2p", or None when
    `op_name` (e.g. "c10d.allreduce_.default") is not a collective this model prices.
    `_c10d_functional.wait_tensor` is not one: it is where the result is waited for."""
    packet = op_name.rsplit(".", 1)[0] if op_name.count(".") >= 2 else op_name
    return _KINDS.get(packet)


def collective_bytes(kind: str, array_bytes) -> int:
    """The buffer size the model takes, from the sizes of the arrays (storages) the op
    touched. allreduce, broadcast, p2p: all of them (the tensors reduced / sent). allgather:
    the gathered output; reduce-scatter: the full input. Both are the larger side of the
    op: the one big array when the other side is one rank's share (`_allgather_base_`), or
    every array but the smallest when the big side is a list of p per-rank tensors (the
    list forms): max(largest, total - smallest)."""
    sizes = [int(b) for b in array_bytes]
    if not sizes:
        return 0
    if kind in ("allgather", "reduce_scatter") and len(sizes) > 1:
        return max(max(sizes), sum(sizes) - min(sizes))
    return sum(sizes)


def collective_time(op_name: str, nbytes, ranks: int, link, *, algorithm: str = "ring") -> float:
    """Seconds the collective `op_name` takes on `nbytes` (as collective_bytes reads it)
    over `ranks` ranks on `link`. Raises OutcoreError for an op that is not a collective."""
    kind = collective_kind(op_name)
    if kind == "allreduce":
        return allreduce_time(nbytes, ranks, link, algorithm)
    if kind == "allgather":
        return allgather_time(nbytes, ranks, link)
    if kind == "reduce_scatter":
        return reduce_scatter_time(nbytes, ranks, link)
    if kind == "broadcast":
        return broadcast_time(nbytes, ranks, link)
    if kind == "p2p":
        _check(nbytes, ranks)
        return p2p_time(nbytes, link)
    raise OutcoreError(f"{op_name!r} is not a collective outcore models; known: "
                       f"{', '.join(sorted(_KINDS))} (with their overload suffix, e.g. .default)")
