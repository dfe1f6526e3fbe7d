"""PyTorch peer of `target/release/examples/bench_step --size PixArt-Bench/4` (README, Results and
benchmarks): diffusers' PixArtTransformer2DModel with ddm's PixArt-Bench/4 (the DiT-Bench/4 trunk:
hidden 256 = 4 heads x 64, depth 6, patch 4, on 1 x 28 x 28; captions of 77 tokens of width 256,
the last quarter of each padding), random weights, batch 64: the median ms of a flow-matching
training step (forward, MSE to e - x0, backward, AdamW lr 1e-4; no EMA) and of an inference
forward of 256 samples, each after warm-up runs.

    /tmp/ddm-peer/venv/bin/python scripts/bench_pixart.py --threads 2
"""
import argparse
import json
import time

import torch
from diffusers import PixArtTransformer2DModel


def median_ms(iters, warmup, f):
    for _ in range(warmup):
        f()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        ms.append((time.perf_counter() - t0) * 1e3)
    return sorted(ms)[len(ms) // 2]


def captions(n, length, width, gen):
    """n random captions and their masks: the last quarter (rounded down) of each is padding."""
    states = torch.randn(n, length, width, generator=gen)
    mask = torch.zeros(n, length)
    mask[:, : length - length // 4] = 1.0
    return states, mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fwd-iters", type=int, default=3)
    p.add_argument("--caption", type=int, default=77)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    width = 256
    model = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=6,
        cross_attention_dim=256, sample_size=28, patch_size=4, caption_channels=width,
    )
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)

    def step():
        n = a.batch
        x0 = torch.randn(n, 1, 28, 28, generator=gen).clamp(-1, 1)
        e = torch.randn(n, 1, 28, 28, generator=gen)
        t = (torch.arange(n) + 0.5) / n
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * e
        states, mask = captions(n, a.caption, width, gen)
        v = model(xt, encoder_hidden_states=states, timestep=t * 1000, encoder_attention_mask=mask).sample
        loss = ((v - (e - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train = median_ms(a.steps, 3, step)
    model.eval()
    xb = torch.randn(256, 1, 28, 28, generator=gen)
    tb = (torch.arange(256) + 0.5) / 256 * 1000
    sb, mb = captions(256, a.caption, width, gen)

    def fwd():
        with torch.inference_mode():
            model(xb, encoder_hidden_states=sb, timestep=tb, encoder_attention_mask=mb)

    fwd256 = median_ms(a.fwd_iters, 1, fwd)
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "size": "PixArt-Bench/4", "params": params,
                      "batch": a.batch, "threads": a.threads, "train_ms_median": round(train, 1),
                      "fwd256_ms_median": round(fwd256, 1)}))


if __name__ == "__main__":
    main()
