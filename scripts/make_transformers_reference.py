"""Make testdata/transformers/: a tiny random transformers CLIPTextModel with a tiny CLIP-style
tokenizer, saved as transformers saves them, with captions, their token ids and transformers'
outputs, so ddm's text encoder and tokenizer are checked against the library users have.

    /tmp/ddm-peer/venv/bin/python scripts/make_transformers_reference.py testdata/transformers

Writes DIR/clip-tiny/ (config.json + model.safetensors from `save_pretrained`, and the
tokenizer.json of `CLIPTokenizerFast.save_pretrained`: what `ddm import --from transformers-clip`
reads) and DIR/clip-tiny.io.safetensors: `input_ids` and `attention_mask` [4, 16] as transformers'
CLIPTokenizerFast makes them (padding="max_length", truncation; the last caption is longer than 16
tokens), `last_hidden_state` [4, 16, 32] and `pooler_output` [4, 32]; the captions are in the
file's metadata (`captions`, a JSON list).

The tokenizer is CLIP's design (NFC, whitespace folding, lowercase; CLIP's split pattern, then
byte-level; BPE with `</w>` word ends; <|startoftext|> ... <|endoftext|>), trained here on a few
captions: CLIP's own 49408-token vocabulary is not downloaded. Every parameter (LayerNorm scales and
shifts too) is perturbed so no tensor is tested at its trivial initial value.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

out = sys.argv[1] if len(sys.argv) > 1 else "testdata/transformers"
os.makedirs(out, exist_ok=True)
torch.manual_seed(20261203)

corpus = [
    "a dark ankle boot",
    "a light, wide pullover with long sleeves",
    "a narrow dress seen from the front",
    "two sneakers; small and bright",
    "a T-shirt/top, dark grey, medium size",
    "an ankle boot with a heel",
    "trousers: long, narrow and dark",
    "a bag with a handle",
]
special = ["<|startoftext|>", "<|endoftext|>"]
CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
tok.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
)
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
)
tok.train_from_iterator(
    corpus,
    trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ),
)
bos, eos = tok.token_to_id(special[0]), tok.token_to_id(special[1])
tok.post_processor = processors.RobertaProcessing(
    (special[1], eos), (special[0], bos), trim_offsets=False, add_prefix_space=False
)
fast = CLIPTokenizerFast(
    tokenizer_object=tok, bos_token=special[0], eos_token=special[1], unk_token=special[1], pad_token=special[1]
)

config = CLIPTextConfig(
    vocab_size=tok.get_vocab_size(),
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    bos_token_id=bos,
    eos_token_id=eos,
    pad_token_id=eos,
    attn_implementation="eager",
)
model = CLIPTextModel(config).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.save_pretrained(os.path.join(out, "clip-tiny"), safe_serialization=True)
fast.save_pretrained(os.path.join(out, "clip-tiny"))

captions = [
    "A dark ankle boot",
    "a  light\tpullover, WIDE",
    "sneakers!",
    "a narrow dress with long sleeves, dark grey trousers and a bag with a handle",
]
enc = fast(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
with torch.no_grad():
    result = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
save_file(
    {
        "input_ids": enc.input_ids.contiguous(),
        "attention_mask": enc.attention_mask.contiguous(),
        "last_hidden_state": result.last_hidden_state.contiguous(),
        "pooler_output": result.pooler_output.contiguous(),
    },
    os.path.join(out, "clip-tiny.io.safetensors"),
    metadata={"captions": json.dumps(captions)},
)
print(f"wrote {out}: vocab {tok.get_vocab_size()}, ids {enc.input_ids.tolist()}")
