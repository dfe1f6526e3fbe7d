//! diffusers' `DiTTransformer2DModel` as a ddm DiT: its config.json becomes a [`DiTConfig`] with
//! `per_block_conditioning` (each block of diffusers' DiT has its own timestep and class
//! embedders) and `freq_shift` 1, and its parameter names become ddm's (the PyTorch reference's):
//!
//! | diffusers | ddm |
//! |---|---|
//! | `pos_embed.proj` | `x_embedder.proj` |
//! | `transformer_blocks.N.norm1.emb.timestep_embedder.linear_1` / `linear_2` | `blocks.N.t_embedder.mlp.0` / `mlp.2` |
//! | `transformer_blocks.N.norm1.emb.class_embedder.embedding_table` | `blocks.N.y_embedder.embedding_table` |
//! | `transformer_blocks.N.norm1.linear` | `blocks.N.adaLN_modulation.1` |
//! | `transformer_blocks.N.attn1.to_q`, `to_k`, `to_v` (stacked) | `blocks.N.attn.qkv` |
//! | `transformer_blocks.N.attn1.to_out.0` | `blocks.N.attn.proj` |
//! | `transformer_blocks.N.ff.net.0.proj` / `ff.net.2` | `blocks.N.mlp.fc1` / `mlp.fc2` |
//! | `proj_out_1` / `proj_out_2` | `final_layer.adaLN_modulation.1` / `final_layer.linear` |
//!
//! The position embedding is not in diffusers' file (a non-persistent buffer); it is the same 2-D
//! sin-cos table, computed. diffusers' LayerNorm before a block's MLP uses `norm_eps` (1e-5, where
//! the reference uses 1e-6): it becomes `mlp_norm_eps` (ignoring it moved the test model's output
//! by 1.8e-5).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{DiTConfig, pos_embed_2d};
use crate::error::{Error, Result};
use crate::host::HostTensor;

/// diffusers' `DiTTransformer2DModel` config.json (the fields ddm reads).
#[derive(Debug, Deserialize)]
struct DiffusersDiT {
    num_attention_heads: usize,
    attention_head_dim: usize,
    in_channels: usize,
    #[serde(default)]
    out_channels: Option<usize>,
    num_layers: usize,
    sample_size: usize,
    patch_size: usize,
    #[serde(default = "gelu_approximate")]
    activation_fn: String,
    #[serde(default)]
    num_embeds_ada_norm: Option<usize>,
    #[serde(default = "ada_norm_zero")]
    norm_type: String,
    #[serde(default)]
    norm_elementwise_affine: bool,
    #[serde(default = "yes")]
    attention_bias: bool,
    #[serde(default = "norm_eps")]
    norm_eps: f64,
}

fn norm_eps() -> f64 {
    1e-5
}

pub(crate) fn gelu_approximate() -> String {
    "gelu-approximate".into()
}
fn ada_norm_zero() -> String {
    "ada_norm_zero".into()
}
pub(crate) fn yes() -> bool {
    true
}

/// Read a diffusers `DiTTransformer2DModel` directory (`config.json`,
/// `diffusion_pytorch_model.safetensors`): the equivalent ddm config and the tensors under ddm's
/// names (not yet checked against each other: building the model does that).
pub fn read_diffusers(dir: &Path) -> Result<(DiTConfig, BTreeMap<String, HostTensor>)> {
    let crate::diffusers::Directory {
        config: c,
        config_path,
        mut tensors,
    } = crate::diffusers::read::<DiffusersDiT>(dir, "DiTTransformer2DModel")?;
    let config = config_of(&c, &tensors, &config_path)?;
    let hidden = config.hidden_size;

    let mut renamed = BTreeMap::new();
    let t = &mut tensors;
    let r = &mut renamed;
    rename(t, r, "pos_embed.proj", "x_embedder.proj");
    rename(t, r, "proj_out_1", "final_layer.adaLN_modulation.1");
    rename(t, r, "proj_out_2", "final_layer.linear");
    for i in 0..c.num_layers {
        rename_block(t, r, i, dir)?;
    }
    renamed.insert("pos_embed".into(), pos_embed_2d(hidden, config.grid()));
    // Whatever was not renamed keeps diffusers' name, so the loader refuses it by that name.
    renamed.extend(tensors);
    Ok((config, renamed))
}

/// ddm's DiT config for a diffusers `DiTTransformer2DModel` config, refused (naming the config
/// file) when it is not the architecture ddm's DiT is.
fn config_of(
    c: &DiffusersDiT,
    tensors: &BTreeMap<String, HostTensor>,
    config_path: &Path,
) -> Result<DiTConfig> {
    let bad = |reason: String| Error::BadMetadata {
        path: config_path.to_path_buf(),
        reason,
    };
    if c.norm_type != "ada_norm_zero"
        || c.activation_fn != "gelu-approximate"
        || c.norm_elementwise_affine
        || !c.attention_bias
    {
        return Err(bad(format!(
            "norm_type {:?}, activation_fn {:?}, norm_elementwise_affine {}, attention_bias {}: ddm's DiT is ada_norm_zero, gelu-approximate, no norm affine, attention bias",
            c.norm_type, c.activation_fn, c.norm_elementwise_affine, c.attention_bias
        )));
    }
    let out = c.out_channels.unwrap_or(c.in_channels);
    if out != c.in_channels && out != 2 * c.in_channels {
        return Err(bad(format!(
            "out_channels {out}: ddm's DiT predicts in_channels ({}) values, or twice that with a learned variance",
            c.in_channels
        )));
    }
    let num_classes = c.num_embeds_ada_norm.unwrap_or(0);
    // The class table has a null row when diffusers' label dropout is on (its default, 0.1).
    let table = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight";
    let class_dropout_prob = match tensors.get(table) {
        Some(t) if t.shape.first() == Some(&(num_classes + 1)) => 0.1,
        _ => 0.0,
    };
    let hidden = c.num_attention_heads * c.attention_head_dim;
    let config = DiTConfig {
        input_size: c.sample_size,
        patch_size: c.patch_size,
        in_channels: c.in_channels,
        hidden_size: hidden,
        depth: c.num_layers,
        num_heads: c.num_attention_heads,
        mlp_ratio: 4.0,
        num_classes,
        class_dropout_prob,
        learn_sigma: out == 2 * c.in_channels,
        frequency_embedding_size: 256,
        t_scale: 1000.0,
        per_block_conditioning: true,
        condition_dim: 0,
        freq_shift: 1.0,
        mlp_norm_eps: c.norm_eps,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// Rename transformer block `i` to ddm's names, its q, k, v stacked into ddm's fused qkv.
fn rename_block(
    t: &mut BTreeMap<String, HostTensor>,
    r: &mut BTreeMap<String, HostTensor>,
    i: usize,
    dir: &Path,
) -> Result<()> {
    let (d, b) = (format!("transformer_blocks.{i}"), format!("blocks.{i}"));
    let emb = format!("{d}.norm1.emb");
    for (from, to) in [
        (
            format!("{emb}.timestep_embedder.linear_1"),
            format!("{b}.t_embedder.mlp.0"),
        ),
        (
            format!("{emb}.timestep_embedder.linear_2"),
            format!("{b}.t_embedder.mlp.2"),
        ),
        (
            format!("{emb}.class_embedder.embedding_table"),
            format!("{b}.y_embedder.embedding_table"),
        ),
        (format!("{d}.norm1.linear"), format!("{b}.adaLN_modulation.1")),
        (format!("{d}.attn1.to_out.0"), format!("{b}.attn.proj")),
        (format!("{d}.ff.net.0.proj"), format!("{b}.mlp.fc1")),
        (format!("{d}.ff.net.2"), format!("{b}.mlp.fc2")),
    ] {
        rename(t, r, &from, &to);
    }
    // q, k, v stacked along the output axis: ddm's fused qkv.
    for suffix in ["weight", "bias"] {
        let parts: Vec<Option<HostTensor>> = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|p| t.remove(&format!("{d}.attn1.{p}.{suffix}")))
            .collect();
        if let [Some(q), Some(k), Some(v)] = &parts[..] {
            if q.shape != k.shape || q.shape != v.shape {
                return Err(Error::ShapeMismatch {
                    path: dir.join(crate::diffusers::WEIGHTS),
                    name: format!("{d}.attn1.to_k.{suffix}"),
                    expected: q.shape.clone(),
                    actual: if q.shape != k.shape {
                        k.shape.clone()
                    } else {
                        v.shape.clone()
                    },
                });
            }
            let mut shape = q.shape.clone();
            shape[0] *= 3;
            let data = [&q.data, &k.data, &v.data]
                .into_iter()
                .flatten()
                .copied()
                .collect();
            r.insert(format!("{b}.attn.qkv.{suffix}"), HostTensor::new(shape, data));
        } else {
            // Put back what was there: the loader names what is missing or left over.
            for (p, x) in ["to_q", "to_k", "to_v"].iter().zip(parts) {
                if let Some(x) = x {
                    t.insert(format!("{d}.attn1.{p}.{suffix}"), x);
                }
            }
        }
    }
    Ok(())
}

/// Move `from.weight` / `from.bias` to `to.weight` / `to.bias`.
fn rename(
    tensors: &mut BTreeMap<String, HostTensor>,
    renamed: &mut BTreeMap<String, HostTensor>,
    from: &str,
    to: &str,
) {
    for suffix in ["weight", "bias"] {
        if let Some(t) = tensors.remove(&format!("{from}.{suffix}")) {
            renamed.insert(format!("{to}.{suffix}"), t);
        }
    }
}
