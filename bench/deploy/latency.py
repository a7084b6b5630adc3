"""Timing what the deployment benchmarks compare: forward passes measured in turns, in PyTorch
eager and in onnxruntime.

The calls of one comparison alternate within one loop, so load from other processes on a
shared machine hits them alike; each gets the median of its repeats. An onnxruntime call runs
the model exported with ``hp.export_model(..., format="onnx")`` (which checks the file's
outputs against the model's) in an ``InferenceSession`` on the CPU with as many threads as
torch has. onnxruntime is an optional extra: ``pip install "hwprune[onnx,onnxruntime]"``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hwprune as hp

__all__ = ["medians_in_turns", "eager", "onnxruntime_call", "timing_header"]


def timing_header(title: str, command_line: str, machine_line: str, threads: int) -> str:
    """The title, command and machine lines of a latency results file (torch and onnxruntime
    threads named; the machine was shared)."""
    from common import header  # bench/ is on sys.path in every script that times

    return header(title, command_line, f"{machine_line} (shared with other jobs), "
                  f"`torch.set_num_threads({threads})`, onnxruntime with as many threads",
                  inline=True)


def medians_in_turns(calls: list[Callable[[], Any]], repeats: int, warmup: int = 3
                     ) -> list[float]:
    """Median seconds of each call, the calls run in turns ``repeats`` times."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(warmup):
        for call in calls:
            call()
    for _ in range(repeats):
        for call, t in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def eager(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One eager forward pass of ``model`` (eval mode, inference mode) on ``x``."""
    model.eval()

    def call() -> Any:
        with torch.inference_mode():
            return model(x)

    return call


def onnxruntime_call(model: nn.Module, x: torch.Tensor, folder: str | Path | None = None
                     ) -> Callable[[], Any]:
    """One onnxruntime run of ``model`` exported for inputs of ``x``'s shape."""
    import onnxruntime

    folder = Path(folder or tempfile.mkdtemp(prefix="hwprune-ort-"))
    path = hp.export_model(model, x, folder / f"{type(model).__name__}-{id(model)}.onnx",
                           format="onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)
