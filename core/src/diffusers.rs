//! A diffusers model directory, as `save_pretrained` writes it: `config.json` (the constructor's
//! arguments; `_class_name` names the class) and `diffusion_pytorch_model.safetensors`. Read by
//! [`crate::vae::read_diffusers`] (AutoencoderKL), [`crate::dit::diffusers`]
//! (DiTTransformer2DModel) and [`crate::pixart::read_diffusers`] (PixArtTransformer2DModel).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::host::{HostTensor, TensorFile};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// What a diffusers directory holds: its config parsed as `T`, and its tensors under diffusers'
/// names (not yet checked against the config: building the model does that).
pub struct Directory<T> {
    pub config: T,
    /// `DIR/config.json`, named in errors about the config.
    pub config_path: PathBuf,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl<T> Directory<T> {
    /// An error about the config, naming its file.
    pub fn bad(&self, reason: String) -> Error {
        Error::BadMetadata {
            path: self.config_path.clone(),
            reason,
        }
    }
}

/// The class `dir`'s config names (`_class_name`), if it names one.
pub fn class_name(dir: &Path) -> Result<Option<String>> {
    let config_path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Io {
        path: config_path.clone(),
        source: e,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadMetadata {
        path: config_path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    Ok(value
        .get("_class_name")
        .and_then(|c| c.as_str())
        .map(String::from))
}

/// Read `dir`, whose config must name `class` (a config without `_class_name` is taken as one).
pub fn read<T: DeserializeOwned>(dir: &Path, class: &str) -> Result<Directory<T>> {
    let config_path = dir.join(CONFIG);
    let bad = |reason: String| Error::BadMetadata {
        path: config_path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Io {
        path: config_path.clone(),
        source: e,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let article = if class.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    };
    if let Some(found) = value.get("_class_name").and_then(|c| c.as_str())
        && found != class
    {
        return Err(bad(format!("a diffusers {found}, not {article} {class}")));
    }
    let config: T =
        serde_json::from_value(value).map_err(|e| bad(format!("not {article} {class} config: {e}")))?;
    let file = TensorFile::read(&dir.join(WEIGHTS))?;
    let tensors = file
        .names()
        .map(|n| Ok((n.to_string(), file.f32(n)?)))
        .collect::<Result<_>>()?;
    Ok(Directory {
        config,
        config_path,
        tensors,
    })
}
