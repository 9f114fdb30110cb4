"""The PyTorch behaviour that :class:`distillpp.accel.GraphPool` works around, shown on a CUDA device.

A graph is captured into a pool handle and dropped while one of its output blocks is still alive;
a second capture into the same bare handle then fails inside the caching allocator, and the failed
``capture_begin`` leaves the default CUDA generator in capture mode, so that a plain
``torch.randn(..., device="cuda")`` afterwards raises. With ``--anchored`` the same steps go through
a :class:`~distillpp.accel.GraphPool` and both succeed. Prints one line per step; exit code 0.

    python benchmarks/cuda_pool_repro.py            # the bare handle
    python benchmarks/cuda_pool_repro.py --anchored # distillpp's anchored pool
"""

import argparse
import gc
import sys

import torch


def capture(lin: torch.nn.Linear, x: torch.Tensor, handle) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lin(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=handle):
        out = lin(x)
    return graph, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anchored", action="store_true", help="use distillpp.accel.GraphPool")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    if args.anchored:
        from distillpp.accel import GraphPool

        pool = GraphPool("cuda")
        handle = pool.handle
    else:
        handle = torch.cuda.graph_pool_handle()
    lin = torch.nn.Linear(16, 16).cuda()
    x = torch.randn(2, 16, device="cuda")
    graph, alive = capture(lin, x, handle)
    del graph
    gc.collect()
    label = "anchored GraphPool" if args.anchored else "bare graph_pool_handle()"
    for step, fn in (("second capture into the same pool", lambda: capture(lin, x, handle)),
                     ("torch.randn on the default CUDA generator", lambda: torch.randn(4, device="cuda"))):
        try:
            fn()
            print(f"{label}: {step}: ok")
        except Exception as e:  # noqa: BLE001 - the point is to show it
            print(f"{label}: {step}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, output kept alive: {tuple(alive.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
