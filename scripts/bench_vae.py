"""PyTorch peer of `target/release/examples/bench_vae` (README, Results and benchmarks): diffusers'
AutoencoderKL with the same config, random weights, the same batch; median ms of the encode
forward (posterior mean), the decode forward, and a training step (MSE + 1e-6 KL per latent
element, backward, AdamW lr 1e-4), each after one untimed run.

    /tmp/ddm-peer/venv/bin/python scripts/bench_vae.py --config small --batch 64 --threads 2
"""
import argparse
import json
import time

import torch
from diffusers import AutoencoderKL

CONFIGS = {
    # vae:3:32:4 on 1 x 28 x 28 (ddm's AutoencoderKLConfig::small(1, 28, 3, 32, 4)).
    "small": dict(in_channels=1, out_channels=1, block_out_channels=(32, 64, 128), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=28, levels=3),
    # sd-vae-ft-mse's architecture at 256 x 256.
    "sd": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=4, norm_num_groups=32, sample_size=256, levels=4),
}


def median_ms(iters, f):
    f()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        ms.append((time.perf_counter() - t0) * 1e3)
    return sorted(ms)[len(ms) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", choices=CONFIGS, default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    c = dict(CONFIGS[a.config])
    levels = c.pop("levels")
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, act_fn="silu", **c)
    s, ch = c["sample_size"], c["in_channels"]
    x = torch.randn(a.batch, ch, s, s).clamp(-1, 1)
    down = 2 ** (levels - 1)
    z = torch.randn(a.batch, c["latent_channels"], s // down, s // down)
    with torch.no_grad():
        enc = median_ms(a.iters, lambda: vae.encode(x).latent_dist.mean)
        dec = median_ms(a.iters, lambda: vae.decode(z).sample)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0)
    latent_size = z[0].numel()

    def step():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = ((rec - x) ** 2).mean() + post.kl().mean() / latent_size * 1e-6
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = median_ms(a.iters, step)
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "config": a.config, "batch": a.batch,
                      "encode_ms": round(enc, 1), "decode_ms": round(dec, 1), "train_step_ms": round(train, 1),
                      "encode_img_per_s": round(a.batch / enc * 1e3, 1), "decode_img_per_s": round(a.batch / dec * 1e3, 1),
                      "train_img_per_s": round(a.batch / train * 1e3, 1)}))


if __name__ == "__main__":
    main()
