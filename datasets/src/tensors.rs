//! Precomputed tensors in a safetensors file: latents to train on (`x`, f32 `[N, ...]`, or u8
//! images), optional labels `y` `[N]`, optional per-sample conditioning vectors `c` `[N, Dc]`
//! (e.g. text embeddings; what a vector-conditioned router reads), optional token sequences
//! `c_tokens` `[N, L, Dt]` with their mask `c_mask` `[N, L]` (a caption's token states, what a
//! PixArt reads), and clustering embeddings computed elsewhere (DINOv2, CLIP),
//! aligned by index (`embeddings` `[N, E]`, in this file or another).

use std::path::PathBuf;

use ddm_core::clip::TextSpace;
use ddm_core::host::{Dtype, TensorFile};
use ddm_core::vae::LatentSpace;

use crate::dataset::{Dataset, Source, Values};
use crate::error::{Error, Result};

pub struct TensorsFile {
    pub path: PathBuf,
}

impl Source for TensorsFile {
    fn describe(&self) -> String {
        format!("tensors ({})", self.path.display())
    }

    fn load(&self) -> Result<Dataset> {
        let f = TensorFile::read(&self.path)?;
        let (dtype, shape) = f.info("x")?;
        if shape.len() < 2 || shape[0] == 0 {
            return Err(Error::bad(
                &self.path,
                format!("`x` has shape {shape:?}; expected [N, ...] with N > 0"),
            ));
        }
        let values = match dtype {
            Dtype::U8 => Values::U8(f.u8("x")?.1.to_vec()),
            _ => Values::F32(f.f32("x")?.data),
        };
        if let Values::F32(x) = &values {
            let bad = x.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::bad(
                    &self.path,
                    format!("`x` has {bad} NaN or infinite values"),
                ));
            }
            // A model learns a range of values; one value has none (and no scale to record).
            if x.iter().all(|&v| v == x[0]) {
                return Err(Error::bad(
                    &self.path,
                    format!("`x` holds one value ({}) in every entry: nothing to learn", x[0]),
                ));
            }
        }
        let labels = if f.contains("y") {
            let y = f.i64("y")?;
            if y.data.len() != shape[0] || y.data.iter().any(|&v| v < 0) {
                return Err(Error::bad(
                    &self.path,
                    format!("`y` must be {} non-negative labels", shape[0]),
                ));
            }
            Some(y.data.iter().map(|&v| v as u32).collect::<Vec<_>>())
        } else {
            None
        };
        let cond = if f.contains("c") {
            let c = f.f32("c")?;
            if c.shape.len() != 2 || c.shape[0] != shape[0] || c.shape[1] == 0 {
                return Err(Error::bad(
                    &self.path,
                    format!(
                        "`c` has shape {:?}; expected [{}, Dc] (one conditioning vector per sample)",
                        c.shape, shape[0]
                    ),
                ));
            }
            if c.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::bad(&self.path, "`c` has non-finite values"));
            }
            Some(c)
        } else {
            None
        };
        let class_names = read_class_names(&f, labels.as_deref())?;
        Ok(Dataset {
            cond,
            tokens: crate::dataset::TokenSequences::read(&f, &self.path, shape[0])?,
            name: format!("tensors:{}", self.path.display()),
            shape: shape[1..].to_vec(),
            values,
            num_classes: labels
                .as_ref()
                .map(|l| l.iter().max().map_or(0, |&m| m as usize + 1)),
            labels,
            class_names,
            mixture: None,
            latent: read_latent_space(&f)?,
            text: read_text_space(&f)?,
        })
    }
}

/// The metadata key under which `ddm encode` records the latent space (JSON).
pub const LATENT_KEY: &str = "ddm-latent";

/// The metadata key under which `ddm encode-text` records the text space of `c` (JSON: which
/// encoder, D, L).
pub const TEXT_SPACE_KEY: &str = "ddm-text-space";

/// The metadata key under which `ddm encode` keeps the source's class names (a JSON list).
pub const CLASS_NAMES_KEY: &str = "ddm-class-names";

/// The text space a tensors file's conditioning vectors are in, if `ddm encode-text` made them.
fn read_text_space(f: &TensorFile) -> Result<Option<TextSpace>> {
    let Some(json) = f.metadata.get(TEXT_SPACE_KEY) else {
        return Ok(None);
    };
    serde_json::from_str(json).map(Some).map_err(|e| {
        Error::bad(
            &f.path,
            format!("`{TEXT_SPACE_KEY}` metadata is not a text space: {e}"),
        )
    })
}

/// The class names a tensors file carries, if any (one per class its labels use, at least).
fn read_class_names(f: &TensorFile, labels: Option<&[u32]>) -> Result<Option<Vec<String>>> {
    let Some(json) = f.metadata.get(CLASS_NAMES_KEY) else {
        return Ok(None);
    };
    let names: Vec<String> = serde_json::from_str(json).map_err(|e| {
        Error::bad(
            &f.path,
            format!("`{CLASS_NAMES_KEY}` metadata is not a list of names: {e}"),
        )
    })?;
    let classes = labels.and_then(|l| l.iter().max()).map_or(0, |&m| m as usize + 1);
    if names.len() < classes {
        return Err(Error::bad(
            &f.path,
            format!("{} class names for labels up to {}", names.len(), classes - 1),
        ));
    }
    Ok(Some(names))
}

/// The latent space a tensors file's `x` is in, if `ddm encode` wrote it.
fn read_latent_space(f: &TensorFile) -> Result<Option<LatentSpace>> {
    let Some(json) = f.metadata.get(LATENT_KEY) else {
        return Ok(None);
    };
    let space: LatentSpace = serde_json::from_str(json).map_err(|e| {
        Error::bad(
            &f.path,
            format!("`{LATENT_KEY}` metadata is not a latent space: {e}"),
        )
    })?;
    let (_, shape) = f.info("x")?;
    if shape[1..] != space.latent_shape[..] {
        return Err(Error::bad(
            &f.path,
            format!(
                "`x` has samples of shape {:?}, but its latent space says {:?}",
                &shape[1..],
                space.latent_shape
            ),
        ));
    }
    Ok(Some(space))
}

/// Read an embeddings matrix `[N, E]` (tensor `embeddings`) for clustering, checking N.
pub fn read_embeddings(path: &std::path::Path, n: usize) -> Result<(usize, Vec<f32>)> {
    let f = TensorFile::read(path)?;
    let e = f.f32("embeddings")?;
    if e.shape.len() != 2 || e.shape[0] != n {
        return Err(Error::bad(
            path,
            format!(
                "`embeddings` has shape {:?}; expected [{n}, E] (one row per sample)",
                e.shape
            ),
        ));
    }
    Ok((e.shape[1], e.data))
}
