"""`outcore trace` from the command line."""
import pytest

import outcore
from outcore.cli.main import main

from .. import zygote


def test_trace_meta_writes_a_loadable_trace(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["trace", "--model", "mlp", "--batch", "8", "--device", "meta", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "in-core peak of live bytes" in text and "recorded in" in text
    trace = outcore.Trace.load(out)
    assert trace.durations == "estimated" and len(trace.functions) > 20


def test_trace_real_adam(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["trace", "--model", "gpt2-tiny", "--batch", "2", "--seq-len", "16", "--device", "cpu",
                 "--optimizer", "adam", "-o", str(out)]) == 0
    trace = outcore.Trace.load(out)
    assert trace.durations == "measured"
    # The label names the sizes given: simulate's rows and the picture's title show it.
    assert trace.info["label"] == "gpt2-tiny seq 16 batch 2 adam on cpu"


def test_a_step_the_model_cannot_take_is_a_clear_error(capsys):
    """A ResNet at 32x32 and batch 1 reaches its last batch norm at 1x1, one value per
    channel: an error naming the sizes to change, not PyTorch's traceback (helper-204)."""
    assert main(["trace", "--model", "resnet18-tiny", "--image-size", "32", "--batch", "1",
                 "--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert "resnet18-tiny cannot train a step at batch 1" in err
    assert "A larger batch, image size or sequence length" in err and "Traceback" not in err


def test_python_dash_m_outcore_is_the_command_and_says_its_version():
    """helper-204: no `outcore --version`, no `python -m outcore`."""
    result = zygote.run(["-m", "outcore", "--version"], timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"outcore {outcore.__version__} ")


def test_help_lists_models_and_an_example():
    result = zygote.run(["-m", "outcore.cli.main", "trace", "--help"], timeout=120)
    assert result.returncode == 0
    for word in ("resnet50", "gpt2", "mlp", "--device", "example"):
        assert word in result.stdout


def test_bad_batch_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exited:      # argparse's own refusal
        main(["trace", "--model", "mlp", "--batch", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "batch: must be at least 1" in err
    assert "building" not in err            # refused before a word of progress (helper-187)


def test_an_output_that_cannot_be_written_is_refused_before_the_recording(tmp_path, capsys):
    missing = tmp_path / "no" / "t.json"
    assert main(["trace", "--model", "mlp", "--batch", "8", "-o", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "recording one step" not in err
    assert main(["trace", "--model", "mlp", "--batch", "8", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_every_output_is_checked_before_the_work_and_written_before_a_word(tmp_path, capsys,
                                                                          monkeypatch):
    """helper-138: `plan -o`, `simulate --timeline` and `plot -o` into a missing directory
    planned (and printed) everything first, then failed with the directory's bare
    OSError; and `trace -o` / `plan -o | head` exited 0 without the file, as the summary
    was printed first and a closed pipe ended the command before the write."""
    trace = tmp_path / "t.json"
    assert main(["trace", "--model", "mlp", "--batch", "8", "--device", "meta", "-o",
                 str(trace)]) == 0
    capsys.readouterr()
    missing = tmp_path / "no"
    for argv in (["plan", str(trace), "--budget", "1GiB", "-o", f"{missing}/s.json"],
                 ["simulate", str(trace), "--budget", "1GiB", "--timeline", f"{missing}/t.json"],
                 ["plot", str(trace), "--budget", "1GiB", "-o", f"{missing}/m.png"]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "does not exist; pass a file path" in err, (argv, out, err)
    for argv, said in ((["simulate", str(trace), "--budget", "1GiB", "--timeline",
                         str(tmp_path / "t.png")], "a timeline is a JSON file"),
                       (["plot", str(trace), "--budget", "1GiB", "-o", str(tmp_path)],
                        "is a directory: name the picture's file")):
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "t.png").exists()

    class ClosedPipe:                  # `outcore ... | head -1`, the reader gone at once
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    for argv, made in ((["trace", "--model", "mlp", "--batch", "8", "--device", "meta",
                         "-o", str(tmp_path / "t2.json")], tmp_path / "t2.json"),
                       (["plan", str(trace), "--budget", "1GiB", "-o",
                         str(tmp_path / "s.json")], tmp_path / "s.json")):
        monkeypatch.setattr("sys.stdout", ClosedPipe())
        assert main(argv) == 0, argv
        monkeypatch.undo()
        assert made.exists(), argv
