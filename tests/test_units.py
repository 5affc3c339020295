import pytest
from hypothesis import given
from hypothesis import strategies as st

import outcore
from outcore.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,value", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096),
    (" 3 kib ", 3072), ("1e3", 1000), (123, 123), (2e9, 2_000_000_000), (4096.0, 4096),
    ("10PB", 10 * 1000**5), ("1PiB", 1024**5)])
def test_parse(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "GiB", "2 parsecs", "-1GiB", -5, True, None, "1..2GB", [1]])
def test_parse_rejects_with_a_hint(bad):
    with pytest.raises(outcore.OutcoreError, match="byte|negative"):
        parse_bytes(bad)


@given(st.integers(0, 2**50))
def test_format_then_parse_is_close(n):
    text = format_bytes(n).replace(" ", "")
    # two decimals of a unit >= 1: at most 0.5% off, plus rounding to a whole byte
    assert abs(parse_bytes(text) - n) <= n * 0.005 + 0.5


def test_a_number_is_bytes_so_a_fraction_of_one_is_refused():
    # budget=1.5 was read as 1 byte: the user most likely meant 1.5 GB.
    with pytest.raises(outcore.OutcoreError, match="not a whole number of bytes.*'1.5GB'"):
        parse_bytes(1.5)
    with pytest.raises(outcore.OutcoreError, match="not a whole number of bytes"):
        outcore.OutOfCore(budget=0.5)
    # The same number as a string without a unit was rounded to 2 bytes.
    for text in ("1.5", "0.4", "2.5 B"):
        with pytest.raises(outcore.OutcoreError, match=r"not a whole number of bytes.*GiB"):
            parse_bytes(text)


@pytest.mark.parametrize("name", ["swap_dir", "state_dir"])
def test_a_directory_that_is_not_a_path_is_refused(name):
    with pytest.raises(outcore.OutcoreError, match=f"{name} must be a directory path.*got 5"):
        outcore.OutOfCore("1MiB", **{name: 5})
    with pytest.raises(outcore.OutcoreError, match=f"{name} must be a directory path.*got ''"):
        outcore.OutOfCore("1MiB", **{name: ""})       # it meant the working directory


def test_a_budget_given_as_a_bare_small_number_asks_for_the_unit(tmp_path, capsys):
    """`--budget 16` and OutOfCore(budget=2) were read as bytes and failed later, at the
    first iteration or with "needs 12.92 GiB", never saying a unit was missing."""
    from outcore.cli.main import main
    from outcore.units import parse_budget
    for value in (2, 16, "16", " 512 ", 65535):
        with pytest.raises(outcore.OutcoreError, match=r"read as \d+ bytes.*write the unit"):
            parse_budget(value)
    with pytest.raises(outcore.OutcoreError, match=r"OutOfCore's budget 2 is read as 2 bytes"):
        outcore.OutOfCore(budget=2, swap_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # with a unit, or large enough to be meant as bytes, it is taken as written
    assert parse_budget("16B") == 16 and parse_budget("300KiB") == 300 * 1024
    assert parse_budget(65536) == 65536 and parse_budget("2147483648") == 2**31
    # where storages that small move, smallest_budget's bare figure is taken (helper-209)
    with outcore.OutOfCore(budget=3072, min_move_bytes=0, swap_dir=tmp_path) as ooc:
        assert ooc.budget == 3072
    with pytest.raises(outcore.OutcoreError, match=r"3072 bytes, .*moving \(4.00 KiB\)"):
        outcore.OutOfCore(budget=3072, min_move_bytes="4KiB", swap_dir=tmp_path)
    path = tmp_path / "t.json"
    from outcore.trace.model import Access, Array, Function, Trace
    Trace((Function(0, "f", "forward", (Access(0, "create"),)),),
          (Array(0, 1 << 20, "float32", "cpu", "transient", "activation", (0, 0), 0, 0, 0, False),),
          "cpu", "measured").save(path)
    for command in ("plan", "simulate"):
        assert main([command, str(path), "--budget", "16"]) == 2
        assert "write the unit, e.g. '16GiB' or '16MiB'" in capsys.readouterr().err


def test_integer_scalars_of_numpy_and_torch_are_bytes_and_a_model_is_named_by_its_type():
    # helper-102: np.int64(4000000) and torch.tensor(4000000) were refused ("write a
    # number of bytes"), and a model passed as the budget printed its whole repr.
    import numpy as np
    import torch
    assert parse_bytes(np.int64(4_000_000)) == parse_bytes(torch.tensor(4_000_000)) == 4_000_000
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(30)])
    with pytest.raises(outcore.OutcoreError) as err:
        outcore.OutOfCore(model)
    said = str(err.value)
    assert said.startswith("cannot read a Sequential (Sequential() as a byte quantity")
    assert "first argument is the budget" in said and len(said) < 300
    assert parse_bytes(np.float64(2e9)) == 2_000_000_000       # a float, as before


def test_a_swap_dir_that_takes_no_files_is_named_so():
    # helper-102: swap_dir="/proc" was refused with "No such file or directory", of a
    # directory that exists.
    import os
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    with pytest.raises(outcore.OutcoreError, match="in /proc: the file system there takes no "
                       "new files; pass swap_dir= a writable directory"):
        outcore.OutOfCore("8MiB", swap_dir="/proc")


@pytest.mark.parametrize("bits", ["12 Mb", "3Gb", "1.5Tb", "4Mib", "2 Gib"])
def test_bits_are_refused_with_the_bytes_to_write(bits):
    """helper-130: "12 Mb" (megabits, as network speeds are written) was read as 12 MB;
    helper-152: "4Mib" (mebibits) as 4 MiB."""
    with pytest.raises(outcore.OutcoreError, match=r"bits \(a lowercase b is a bit\).*B'"):
        parse_bytes(bits)
