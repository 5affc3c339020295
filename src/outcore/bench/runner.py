"""Runs benchmark configs, each in a fresh process, with a progress bar.

A config is a plain dict (it travels as JSON to `outcore.bench.child`):
    model, batch, image_size | seq_len, optimizer, seed,
    variant ("in-core" | "checkpoint" | "offload-hooks" | "streamed-offload" | "outcore"),
    device ("cpu" | "cuda"), policy, budget and recompute (outcore), steps, warmup, swap_dir,
    env (extra environment),
    compute_s and disk (outcore: to predict the step time with the simulator).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from ..memory.pages import TORCH_ENV, plain_environment
from ..units import format_bytes


def label(cfg: dict) -> str:
    text = f"{cfg['model']} b{cfg['batch']} {cfg['variant']}"
    if cfg["variant"] == "outcore":
        text += f" {cfg['policy']} budget {format_bytes(cfg['budget'])}"
        if cfg.get("recompute", "auto") != "auto":
            text += f" recompute={cfg['recompute']}"
    if cfg.get("return_freed_memory", True) is not True:
        text += f" memory={cfg['return_freed_memory']}"
    if cfg.get("env"):
        text += " [" + " ".join(f"{k}={v}" for k, v in cfg["env"].items()) + "]"
    return text


class Progress:
    """One line on stderr: a bar over the runs, the current run and its step."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.started = time.perf_counter()
        self.tty = self.stream.isatty()

    def show(self, current: str, detail: str = "") -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s  {current} {detail}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        elif not detail:                       # a log: one line per run started
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish_one(self, current: str, result: dict) -> None:
        self.done += 1
        if "error" in result:
            outcome = "FAILED: " + result["error"].strip().splitlines()[-1][:120]
        else:
            outcome = f"{result['step_s']:.2f} s/step"
        text = f"[{self.done}/{self.total}] {current}: {outcome}"
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def child_environment(cfg: dict) -> dict:
    """The environment of the process that runs `cfg`: this one's, plus the config's own;
    a plain-PyTorch variant gets THP_MEM_ALLOC_ENABLE as the user set it, or PyTorch's
    default, not the 1 that `import outcore` set here (NOTE [Huge pages by default], rule 3)."""
    env = {**os.environ, **cfg.get("env", {})}
    if cfg.get("variant") != "outcore" and TORCH_ENV not in cfg.get("env", {}):
        return plain_environment(env)
    return env


def run_config(cfg: dict, progress: Progress | None = None, timeout_s: float = 1800) -> dict:
    """Run one config in a fresh Python process; the result dict, or {"error": ...}."""
    name = label(cfg)
    if progress:
        progress.show(name)
    proc = subprocess.Popen([sys.executable, "-m", "outcore.bench.child", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_environment(cfg))
    err_lines: list[str] = []

    def pump():
        for line in proc.stderr:
            err_lines.append(line)
            if progress and line.startswith("step "):
                progress.show(name, line.strip())
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        proc.kill()
    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        out = proc.stdout.read()          # until the child exits (stderr is pumped apart)
        proc.wait()
        reader.join()
    finally:
        timer.cancel()
    if timed_out.is_set():
        err_lines.append(f"timed out after {timeout_s:.0f} s\n")
    lines = out.strip().splitlines()
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        tail = "".join(line for line in err_lines if not line.startswith("step "))[-3000:]
        result = {"error": tail or f"exit status {proc.returncode}"}
    if progress:
        progress.finish_one(name, result)
    return result
