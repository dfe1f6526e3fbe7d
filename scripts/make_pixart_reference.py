"""Make testdata/diffusers/pixart-tiny: a tiny random PixArtTransformer2DModel saved as diffusers
saves it, with one input and diffusers' output, so ddm's PixArt (cross-attention to a caption,
adaLN-single) and its import are checked against the library PixArt checkpoints come from.

    /tmp/ddm-peer/venv/bin/python scripts/make_pixart_reference.py testdata/diffusers

Writes DIR/pixart-tiny/config.json + diffusion_pytorch_model.safetensors (what `save_pretrained`
writes, what `ddm import --from diffusers DIR/pixart-tiny` reads) and DIR/pixart-tiny.io.safetensors:
4 x 8 x 8 latents, patch 2, 2 blocks of width 32 (2 heads), captions of 5 tokens of width 24
projected to 32, learned sigma (8 output channels), no additional (resolution) conditions.
io: `x` [3, 4, 8, 8], `timestep` [3] (diffusers' 0..1000 scale), `encoder_hidden_states`
[3, 5, 24], `encoder_attention_mask` [3, 5] (1: token, 0: padding; the last row all padding, the
null caption), `sample` [3, 8, 8, 8].
Every parameter is perturbed so no tensor is tested at its initial value.
"""
import json
import os
import sys

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "testdata/diffusers"
os.makedirs(out, exist_ok=True)
torch.manual_seed(20261203)

model = PixArtTransformer2DModel(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=32,
    sample_size=8,
    patch_size=2,
    caption_channels=24,
).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.save_pretrained(os.path.join(out, "pixart-tiny"), safe_serialization=True)

x = torch.randn(3, 4, 8, 8)
timestep = torch.tensor([10.0, 500.0, 999.0])
caption = torch.randn(3, 5, 24)
mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
with torch.no_grad():
    sample = model(
        x,
        encoder_hidden_states=caption,
        timestep=timestep,
        encoder_attention_mask=mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
save_file(
    {
        "x": x.contiguous(),
        "timestep": timestep.contiguous(),
        "encoder_hidden_states": caption.contiguous(),
        "encoder_attention_mask": mask.contiguous(),
        "sample": sample.contiguous(),
    },
    os.path.join(out, "pixart-tiny.io.safetensors"),
)
print(json.dumps({"pixart-tiny": {"sample": list(sample.shape), "abs_max": float(sample.abs().max())}}))
