"""Probe the lent GPU: environment, and training-step throughput of candidate 32x32 zoo UNets.

Run: python3 benchmarks/probe_gpu.py  (prints a table; used to size the Fashion-MNIST zoo runs).
"""
import sys, time, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
import diffusers
print("diffusers", diffusers.__version__)
from diffusers import UNet2DModel
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    print("gpu", torch.cuda.get_device_name(0))
configs = {
    "A (32,64,128) lpb1": dict(block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "B (64,128,128) lpb1": dict(block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "C (48,96,192) lpb2": dict(block_out_channels=(48, 96, 192), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for name, cfg in configs.items():
    m = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, num_class_embeds=11, norm_num_groups=16, **cfg).to(dev)
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    for bs in (256, 1024):
        x = torch.randn(bs, 1, 32, 32, device=dev); t = torch.randint(0, 1000, (bs,), device=dev); y = torch.randint(0, 11, (bs,), device=dev)
        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                loss = (m(x, t, class_labels=y).sample.float() - x).pow(2).mean()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        for _ in range(3): step()
        if dev == "cuda": torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(steps): step()
        if dev == "cuda": torch.cuda.synchronize()
        dt = (time.time() - t0) / steps
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            xb = torch.randn(4096 if dev == "cuda" else 64, 1, 32, 32, device=dev)
            tb = torch.randint(0, 1000, (len(xb),), device=dev); yb = torch.randint(0, 11, (len(xb),), device=dev)
            m(xb, tb, class_labels=yb)
            if dev == "cuda": torch.cuda.synchronize()
            t1 = time.time(); m(xb, tb, class_labels=yb)
            if dev == "cuda": torch.cuda.synchronize()
            fwd = time.time() - t1
        print(f"{name:22s} params={n/1e6:.2f}M fp16={2*n/2**20:.1f}MiB batch={bs:5d} train_step={dt*1000:.1f}ms "
              f"({bs/dt:.0f} img/s) fwd@{len(xb)}={fwd*1000:.1f}ms", flush=True)
