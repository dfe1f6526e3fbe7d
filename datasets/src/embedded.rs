//! The embedded default: the first 10,000 Fashion-MNIST *training* images and labels, compiled into
//! the binary, so `ddm quickstart` works on a fresh machine with no network and no package.
//!
//! The files in `datasets/data/` were cut from Debian's `dataset-fashion-mnist` (identical content
//! to upstream) with Python: the IDX header with count 10000 followed by the first 10000 records,
//! gzip level 9, mtime 0. Licence (MIT, Zalando SE): `datasets/data/LICENSE-fashion-mnist`.

use std::path::Path;

use crate::dataset::{Dataset, Source};
use crate::error::{Error, Result};
use crate::idx::{FASHION_MNIST_CLASSES, idx_dataset};
use ddm_core::digest::sha256_hex;

const IMAGES: &[u8] = include_bytes!("../data/fashion-mnist-train-10k-images-idx3-ubyte.gz");
const LABELS: &[u8] = include_bytes!("../data/fashion-mnist-train-10k-labels-idx1-ubyte.gz");
/// sha256 of the decompressed embedded files.
const IMAGES_SHA256: &str = "ed2e37ed5a3a57d212141a69fe0a0de5a7126ffba14ac3f7e76f5f52cc04b1f0";
const LABELS_SHA256: &str = "a69f2dad024ca220a8c4d85f621fdf929042d40c444abde2868903e9220ad517";

/// The embedded 10k-image Fashion-MNIST subset.
pub struct EmbeddedFashionMnist;

impl Source for EmbeddedFashionMnist {
    fn describe(&self) -> String {
        "fashion-mnist-10k (embedded, first 10,000 training images)".into()
    }

    fn load(&self) -> Result<Dataset> {
        let unzip = |name: &str, gz: &[u8], want: &str| -> Result<Vec<u8>> {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut out)
                .map_err(|e| Error::bad(name, format!("embedded data is damaged: {e}")))?;
            let got = sha256_hex(&out);
            if got != want {
                return Err(Error::Checksum {
                    path: name.into(),
                    expected: want.into(),
                    actual: got,
                });
            }
            Ok(out)
        };
        let (ip, lp) = (Path::new("<embedded images>"), Path::new("<embedded labels>"));
        let images = unzip("<embedded images>", IMAGES, IMAGES_SHA256)?;
        let labels = unzip("<embedded labels>", LABELS, LABELS_SHA256)?;
        idx_dataset(
            "fashion-mnist-10k".into(),
            (ip, &images),
            Some((lp, &labels)),
            Some(FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads with no network and no package installed: it is in the binary.
    #[test]
    fn embedded_subset_loads_offline() {
        let d = EmbeddedFashionMnist.load().unwrap();
        assert_eq!(d.len(), 10_000);
        assert_eq!(d.shape, vec![1, 28, 28]);
        assert_eq!(d.num_classes, Some(10));
        let labels = d.labels.as_ref().unwrap();
        // Every class is present, roughly balanced.
        let mut counts = [0usize; 10];
        for &l in labels {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        // The first training image of Fashion-MNIST is an ankle boot (label 9).
        assert_eq!(labels[0], 9);
    }
}
