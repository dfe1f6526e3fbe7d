//! Parse a `--data` argument into a [`Source`].
//!
//! | `--data` | source |
//! |---|---|
//! | `fashion-mnist` (or `fashion-mnist:test`) | Fashion-MNIST: Debian package, cache, or download |
//! | `fashion-mnist:DIR` | Fashion-MNIST files in DIR (pinned checksums) |
//! | `fashion-mnist-10k` | the first 10,000 training images, embedded in ddm |
//! | `default` | `fashion-mnist` if it is on disk, else `fashion-mnist-10k` |
//! | `idx:DIR` (`idx-test:DIR`) | any MNIST-family directory |
//! | `cifar10:DIR` (`cifar10-test:DIR`) | CIFAR-10 binary batches |
//! | `images:DIR[@SIZE]` | a folder of PNG/JPEG images (default 32 x 32) |
//! | `tensors:FILE` | safetensors with `x` (and `y`) |
//! | `gmm:SPEC.json` | a Gaussian mixture |

use std::path::PathBuf;

use crate::cifar::Cifar10;
use crate::dataset::Source;
use crate::embedded::EmbeddedFashionMnist;
use crate::error::{Error, Result};
use crate::folder::ImageFolder;
use crate::idx::{FashionMnist, IdxDir, Split};
use crate::mixture::MixtureFile;
use crate::tensors::TensorsFile;

/// The source named by a `--data` argument. `download` allows fetching Fashion-MNIST.
/// The largest side `images:DIR@SIZE` resizes to (a 4096 x 4096 RGB image is 50 MB as u8).
pub const MAX_IMAGE_SIZE: usize = 4096;

pub fn parse_source(arg: &str, download: bool) -> Result<Box<dyn Source>> {
    let (kind, rest) = match arg.split_once(':') {
        Some((k, r)) => (k, Some(r)),
        None => (arg, None),
    };
    let need = |what: &str| -> Result<PathBuf> {
        rest.filter(|r| !r.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| Error::Invalid(format!("--data {kind}:<{what}> needs a {what}")))
    };
    Ok(match kind {
        "fashion-mnist" => match rest {
            None | Some("train") => Box::new(FashionMnist {
                dir: None,
                split: Split::Train,
                download,
            }),
            Some("test") => Box::new(FashionMnist {
                dir: None,
                split: Split::Test,
                download,
            }),
            Some(dir) => Box::new(FashionMnist {
                dir: Some(dir.into()),
                split: Split::Train,
                download,
            }),
        },
        "fashion-mnist-10k" => Box::new(EmbeddedFashionMnist),
        "default" => {
            let full = FashionMnist {
                dir: None,
                split: Split::Train,
                download: false,
            };
            if full.locate().is_ok() {
                Box::new(full)
            } else {
                Box::new(EmbeddedFashionMnist)
            }
        }
        "idx" | "idx-test" => Box::new(IdxDir {
            dir: need("DIR")?,
            split: if kind == "idx" { Split::Train } else { Split::Test },
            name: arg.to_string(),
            class_names: None,
            pinned: vec![],
        }),
        "cifar10" | "cifar10-test" => Box::new(Cifar10 {
            dir: need("DIR")?,
            split: if kind == "cifar10" {
                Split::Train
            } else {
                Split::Test
            },
        }),
        "images" => {
            let spec = need("DIR")?.to_string_lossy().into_owned();
            let (dir, size) = match spec.rsplit_once('@') {
                Some((d, s)) => (
                    d.to_string(),
                    s.parse()
                        .map_err(|_| Error::Invalid(format!("bad image size `{s}` in --data {arg}")))?,
                ),
                None => (spec, 32),
            };
            if !(1..=MAX_IMAGE_SIZE).contains(&size) {
                return Err(Error::Invalid(format!(
                    "image size {size} in --data {arg}: images are resized to SIZE x SIZE, 1 to {MAX_IMAGE_SIZE}"
                )));
            }
            Box::new(ImageFolder {
                dir: dir.into(),
                size,
            })
        }
        "tensors" => Box::new(TensorsFile { path: need("FILE")? }),
        "gmm" => Box::new(MixtureFile {
            path: need("SPEC.json")?,
        }),
        _ => {
            return Err(Error::Invalid(format!(
                "unknown --data `{arg}`: expected fashion-mnist[:DIR|:test], fashion-mnist-10k, default, idx:DIR, cifar10:DIR, images:DIR[@SIZE], tensors:FILE or gmm:SPEC.json"
            )));
        }
    })
}
