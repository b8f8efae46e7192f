"""What the PyTorch peers of `nibble bench-gpu` share (tools/bench_tinygemm.py,
tools/bench_torch_attention.py): PyTorch on a CUDA device, or a clear exit; CUDA-event medians timed as
bench-gpu times its own kernels."""
import sys


def cuda_torch(script: str):
    """PyTorch, with a CUDA device; None (after saying why on stderr) when either is missing."""
    try:
        import torch
    except ImportError:
        print(f"{script}: PyTorch is not installed", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device", file=sys.stderr)
        return None
    return torch


def median_us(torch, call, iterations: int, repetitions: int) -> float:
    """Median over `repetitions` timed loops of the mean microseconds of one call(i), after three
    untimed calls. i is a running count across the loops, so a caller rotating copies by i % copies
    does not find the last loop's copies in L2. Each loop is queued behind a sleep on the device long
    enough for Python to queue every call first (as bench-gpu queues its loops behind device_delay), so
    the calls run back to back and the host's launch rate is not what is timed."""
    for i in range(3):
        call(i)
    sleep = getattr(torch.cuda, "_sleep", None)  # cycles; ~1 ms + ~0.1 ms a call at ~2 GHz
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    next_call = 3
    for _ in range(repetitions):
        if sleep is not None:
            sleep(int(2e6 * (1 + 0.1 * iterations)))
        start.record()
        for _ in range(iterations):
            call(next_call)
            next_call += 1
        stop.record()
        torch.cuda.synchronize()
        runs.append(1e3 * start.elapsed_time(stop) / iterations)
    runs.sort()
    return runs[len(runs) // 2]
