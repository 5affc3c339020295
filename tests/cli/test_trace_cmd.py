"""`outcore trace` from the command line."""
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
    assert outcore.Trace.load(out).durations == "measured"


def test_help_lists_models_and_an_example():
    result = zygote.run(["-m", "outcore.cli.main", "trace", "--help"], timeout=120)
    assert result.returncode == 0
    for word in ("resnet50", "gpt2", "mlp", "--device", "example"):
        assert word in result.stdout


def test_bad_batch_is_a_clear_error(capsys):
    assert main(["trace", "--model", "mlp", "--batch", "0"]) == 2
    assert "batch must be at least 1" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_recording(tmp_path, capsys):
    missing = tmp_path / "no" / "t.json"
    assert main(["trace", "--model", "mlp", "--batch", "8", "-o", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "recording one step" not in err
    assert main(["trace", "--model", "mlp", "--batch", "8", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
