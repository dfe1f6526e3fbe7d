//! CIFAR-10 binary batches (`data_batch_{1..5}.bin`, `test_batch.bin`): records of one label byte
//! followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue; row-major 32 x 32).

use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Source, Values};
use crate::error::{Error, Result};
use crate::idx::Split;

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
const RECORD: usize = 1 + 3 * 32 * 32;

/// A directory of CIFAR-10 binary batches (e.g. `cifar-10-batches-bin/`).
pub struct Cifar10 {
    pub dir: PathBuf,
    pub split: Split,
}

/// Parse one batch file's bytes into (labels, pixels [n, 3, 32, 32]).
pub fn parse_batch(path: &Path, b: &[u8]) -> Result<(Vec<u32>, Vec<u8>)> {
    if b.is_empty() || !b.len().is_multiple_of(RECORD) {
        return Err(Error::bad(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                b.len()
            ),
        ));
    }
    let mut labels = Vec::with_capacity(b.len() / RECORD);
    let mut pixels = Vec::with_capacity(b.len() / RECORD * (RECORD - 1));
    for (i, rec) in b.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(Error::bad(
                path,
                format!("record {i} has label {}, CIFAR-10 labels are 0..9", rec[0]),
            ));
        }
        labels.push(rec[0] as u32);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((labels, pixels))
}

impl Source for Cifar10 {
    fn describe(&self) -> String {
        format!("cifar10 ({})", self.dir.display())
    }

    fn load(&self) -> Result<Dataset> {
        let files: Vec<String> = match self.split {
            Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            Split::Test => vec!["test_batch.bin".into()],
        };
        let (mut labels, mut pixels) = (vec![], vec![]);
        for f in files {
            let p = self.dir.join(&f);
            let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            let (l, px) = parse_batch(&p, &b)?;
            labels.extend(l);
            pixels.extend(px);
        }
        Ok(Dataset {
            name: format!(
                "cifar10/{}",
                if self.split == Split::Train {
                    "train"
                } else {
                    "test"
                }
            ),
            shape: vec![3, 32, 32],
            values: Values::U8(pixels),
            labels: Some(labels),
            num_classes: Some(10),
            class_names: Some(CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()),
            mixture: None,
            latent: None,
            text: None,
            cond: None,
            tokens: None,
        })
    }
}
