"""Real memory: a CNN trained under a budget of a quarter of its in-core step holds at
most half the resident memory of the same training in plain PyTorch, each measured as
the peak RSS of a fresh process."""
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import sys, torch, outcore
    from outcore.workloads.digits import digit_batches
    from outcore.workloads.resnet import resnet50

    def peak_rss():
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child
        # of a large parent (pytest) would report the parent's size.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    mode, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = next(digit_batches(batch, 64))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
        return loss.item()

    if mode == "incore":
        step()
        with outcore.record() as rec:
            step()
        managed_peak = rec.trace.peak(actual=True)[0]
    else:
        budget = int(sys.argv[3])
        with outcore.OutOfCore(budget=budget) as ooc:
            for _ in range(3):
                with ooc.iteration():
                    step()
            report = ooc.report()
        assert report.iterations[-1].mode == "replay", report
        assert report.iterations[-1].peak_resident <= budget, report
        managed_peak = 0
    rss = peak_rss()
    print(rss, managed_peak)
""")


def _run(*args) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rss, peak = out.stdout.split()
    return int(rss), int(peak)


def test_quarter_budget_halves_peak_rss():
    batch = 160
    incore_rss, managed_peak = _run("incore", batch)
    ooc_rss, _ = _run("ooc", batch, managed_peak // 4)
    print(f"in-core peak RSS {incore_rss / 2**20:.0f} MiB (managed peak {managed_peak / 2**20:.0f} MiB); "
          f"outcore at a quarter: {ooc_rss / 2**20:.0f} MiB")
    assert ooc_rss <= incore_rss / 2, (ooc_rss, incore_rss)
