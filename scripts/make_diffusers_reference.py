"""Make testdata/diffusers/: tiny random diffusers models, saved as diffusers saves them, with one
input and diffusers' outputs, so ddm's AutoencoderKL (and its diffusers import) is checked against
the library users actually train with.

    /tmp/ddm-peer/venv/bin/python scripts/make_diffusers_reference.py testdata/diffusers

Writes, per model, DIR/<name>/config.json + diffusion_pytorch_model.safetensors (what
`save_pretrained` writes, what `ddm import --from diffusers-vae DIR/<name>` reads) and
DIR/<name>.io.safetensors:
- vae-tiny: AutoencoderKL for 1 x 28 x 28 images (Fashion-MNIST's shape), three levels (two 2x
  downsamplings: latents 4 x 7 x 7), GroupNorm of 4 groups. io: `x` [2, 1, 28, 28], the posterior's
  `mean` and `logvar` (after quant_conv), `decoded` = decode(mean).
- dit-tiny: DiTTransformer2DModel on 4 x 8 x 8 latents, patch 2, 2 blocks of width 32 (2 heads),
  10 classes, learned sigma (8 output channels). io: `x` [3, 4, 8, 8], `timestep` [3] (diffusers'
  0..1000 scale), `class_labels` [3] (the last one the null class 10), `sample` [3, 8, 8, 8].
Every parameter (GroupNorm scales and shifts too, which start at 1 and 0; DiT's zero-initialised
adaLN and output layers) is perturbed so no tensor is tested at its trivial initial value.
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from safetensors.torch import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "testdata/diffusers"
os.makedirs(out, exist_ok=True)
torch.manual_seed(20261130)


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


vae = AutoencoderKL(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=28,
    scaling_factor=0.5,
).eval()
perturb(vae)
vae.save_pretrained(os.path.join(out, "vae-tiny"), safe_serialization=True)

x = torch.rand(2, 1, 28, 28) * 2 - 1
with torch.no_grad():
    posterior = vae.encode(x).latent_dist
    decoded = vae.decode(posterior.mean).sample
save_file(
    {
        "x": x.contiguous(),
        "mean": posterior.mean.contiguous(),
        "logvar": posterior.logvar.contiguous(),
        "decoded": decoded.contiguous(),
    },
    os.path.join(out, "vae-tiny.io.safetensors"),
)
dit = DiTTransformer2DModel(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
).eval()
perturb(dit)
dit.save_pretrained(os.path.join(out, "dit-tiny"), safe_serialization=True)
xd = torch.randn(3, 4, 8, 8)
timestep = torch.tensor([10.0, 500.0, 999.0])
class_labels = torch.tensor([3, 7, 10])
with torch.no_grad():
    sample = dit(xd, timestep=timestep, class_labels=class_labels).sample
save_file(
    {
        "x": xd.contiguous(),
        "timestep": timestep.contiguous(),
        "class_labels": class_labels.contiguous(),
        "sample": sample.contiguous(),
    },
    os.path.join(out, "dit-tiny.io.safetensors"),
)
print(json.dumps({"dit-tiny": {"sample": list(sample.shape), "abs_max": float(sample.abs().max())}}))
print(json.dumps({"vae-tiny": {"latent": list(posterior.mean.shape), "decoded_abs_max": float(decoded.abs().max())}}))
