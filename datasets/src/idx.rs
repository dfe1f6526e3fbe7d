//! IDX files (the MNIST family): readers, and where Fashion-MNIST comes from.
//!
//! Fashion-MNIST is looked for, in order: a directory the user names; the Debian package's files
//! (`apt-get install dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist); the cache
//! (`$DDM_CACHE`, else `$XDG_CACHE_HOME/ddm`, else `~/.cache/ddm`); and only then downloaded from
//! the dataset's official mirror into the cache. Files are verified against pinned sha256 sums of
//! their *decompressed* content (Debian recompresses the archives, so the gz bytes differ from
//! upstream's while the data is the same). No network is touched when the data is present.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Source, Values};
use crate::error::{Error, Result};
use ddm_core::digest::sha256_hex;
use ddm_core::progress::Progress;

/// The Fashion-MNIST class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The official mirror (plain HTTP; integrity comes from the pinned sums below).
pub const FASHION_MNIST_MIRROR: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com";

/// (file, sha256 of the decompressed content).
pub const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
];

/// Read a file, gunzipping it if it is gzip (by magic bytes, not by name).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    gunzip_if_gz(path, raw)
}

fn gunzip_if_gz(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::bad(path, format!("not a valid gzip stream ({e}); is it truncated?")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse IDX image bytes: magic 0x00000803, count, rows, cols, then u8 pixels.
/// Returns (count, rows, cols, pixels).
pub fn parse_idx_images(path: &Path, b: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    if b.len() < 16 {
        return Err(Error::bad(
            path,
            format!("{} bytes is too short for an IDX image header", b.len()),
        ));
    }
    let word = |i: usize| u32::from_be_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize;
    if word(0) != 0x803 {
        return Err(Error::bad(
            path,
            format!(
                "IDX magic number {:#010x}, expected 0x00000803 (u8 images, 3 dims)",
                word(0)
            ),
        ));
    }
    let (n, r, c) = (word(1), word(2), word(3));
    let want = n
        .checked_mul(r)
        .and_then(|v| v.checked_mul(c))
        .and_then(|v| v.checked_add(16))
        .unwrap_or(usize::MAX);
    if b.len() != want {
        return Err(Error::bad(
            path,
            format!(
                "header says {n} images of {r}x{c} ({want} bytes), file has {} bytes",
                b.len()
            ),
        ));
    }
    Ok((n, r, c, b[16..].to_vec()))
}

/// Parse IDX label bytes: magic 0x00000801, count, then u8 labels.
pub fn parse_idx_labels(path: &Path, b: &[u8]) -> Result<Vec<u32>> {
    if b.len() < 8 {
        return Err(Error::bad(
            path,
            format!("{} bytes is too short for an IDX label header", b.len()),
        ));
    }
    let magic = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    if magic != 0x801 {
        return Err(Error::bad(
            path,
            format!("IDX magic number {magic:#010x}, expected 0x00000801 (u8 labels, 1 dim)"),
        ));
    }
    let n = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
    if b.len() - 8 != n {
        return Err(Error::bad(
            path,
            format!("header says {n} labels, file has {} label bytes", b.len() - 8),
        ));
    }
    Ok(b[8..].iter().map(|&l| l as u32).collect())
}

/// Build an image dataset from IDX image and (optional) label bytes.
pub fn idx_dataset(
    name: String,
    images: (&Path, &[u8]),
    labels: Option<(&Path, &[u8])>,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    let (n, r, c, pixels) = parse_idx_images(images.0, images.1)?;
    let labels = match labels {
        Some((p, b)) => {
            let l = parse_idx_labels(p, b)?;
            if l.len() != n {
                return Err(Error::bad(
                    p,
                    format!("{} labels for {n} images in {}", l.len(), images.0.display()),
                ));
            }
            Some(l)
        }
        None => None,
    };
    let num_classes = labels
        .as_ref()
        .map(|l| l.iter().max().map_or(0, |&m| m as usize + 1));
    let num_classes = match (&class_names, num_classes) {
        (Some(names), Some(k)) => Some(names.len().max(k)),
        (_, k) => k,
    };
    Ok(Dataset {
        name,
        shape: vec![1, r, c],
        values: Values::U8(pixels),
        labels,
        num_classes,
        class_names,
        mixture: None,
        latent: None,
        text: None,
        cond: None,
        tokens: None,
    })
}

/// Which split of an MNIST-family directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// An MNIST-family directory: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
pub struct IdxDir {
    pub dir: PathBuf,
    pub split: Split,
    pub name: String,
    pub class_names: Option<Vec<String>>,
    /// Pinned sha256 sums of decompressed content, by file name (empty: not checked).
    pub pinned: Vec<(&'static str, &'static str)>,
}

impl IdxDir {
    fn find(&self, stem: &str) -> Result<PathBuf> {
        for name in [format!("{stem}.gz"), stem.to_string()] {
            let p = self.dir.join(&name);
            if p.exists() {
                return Ok(p);
            }
        }
        Err(Error::NotFound {
            what: format!("{stem}[.gz] in {}", self.dir.display()),
            hint: "an MNIST-family directory holds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]".into(),
        })
    }

    fn read_checked(&self, path: &Path) -> Result<Vec<u8>> {
        let data = read_maybe_gz(path)?;
        let fname = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
        let key = if fname.ends_with(".gz") {
            fname.to_string()
        } else {
            format!("{fname}.gz")
        };
        if let Some((_, want)) = self.pinned.iter().find(|(f, _)| *f == key) {
            let got = sha256_hex(&data);
            if got != *want {
                return Err(Error::Checksum {
                    path: path.to_path_buf(),
                    expected: want.to_string(),
                    actual: got,
                });
            }
        }
        Ok(data)
    }
}

impl Source for IdxDir {
    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.dir.display())
    }

    fn load(&self) -> Result<Dataset> {
        let p = self.split.prefix();
        let ip = self.find(&format!("{p}-images-idx3-ubyte"))?;
        let lp = self.find(&format!("{p}-labels-idx1-ubyte"))?;
        let (ib, lb) = (self.read_checked(&ip)?, self.read_checked(&lp)?);
        idx_dataset(
            self.name.clone(),
            (&ip, &ib),
            Some((&lp, &lb)),
            self.class_names.clone(),
        )
    }
}

/// Fashion-MNIST from a named directory, the Debian package, the cache, or (last) the mirror.
pub struct FashionMnist {
    pub dir: Option<PathBuf>,
    pub split: Split,
    /// Allow downloading into the cache when the files are nowhere on disk.
    pub download: bool,
}

impl FashionMnist {
    /// The directory holding the files (downloading if allowed and needed).
    pub fn locate(&self) -> Result<PathBuf> {
        if let Some(d) = &self.dir {
            return Ok(d.clone());
        }
        let has_all = |d: &Path| FASHION_MNIST_FILES.iter().all(|(f, _)| d.join(f).exists());
        let debian = PathBuf::from(DEBIAN_FASHION_MNIST);
        if has_all(&debian) {
            return Ok(debian);
        }
        let cache = ddm_core::env::cache_dir().join("fashion-mnist");
        if has_all(&cache) {
            return Ok(cache);
        }
        if !self.download {
            return Err(Error::NotFound {
                what: "Fashion-MNIST".into(),
                hint: format!(
                    "install it (`apt-get install dataset-fashion-mnist`), name a directory, or allow the download into {}",
                    cache.display()
                ),
            });
        }
        download_fashion_mnist(FASHION_MNIST_MIRROR, &cache, &())?;
        Ok(cache)
    }
}

impl Source for FashionMnist {
    fn describe(&self) -> String {
        format!("fashion-mnist/{}", self.split.prefix())
    }

    fn load(&self) -> Result<Dataset> {
        let dir = self.locate()?;
        let split = if self.split == Split::Train {
            "train"
        } else {
            "test"
        };
        IdxDir {
            dir,
            split: self.split,
            name: format!("fashion-mnist/{split}"),
            class_names: Some(FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()),
            pinned: FASHION_MNIST_FILES.to_vec(),
        }
        .load()
    }
}

/// Download the four Fashion-MNIST files from `base_url` into `dir`, verifying each against its
/// pinned sum before it is put in place (atomically). Files already there and valid are kept.
/// Each download's bytes are reported to `progress`.
pub fn download_fashion_mnist(base_url: &str, dir: &Path, progress: &dyn Progress) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let client = ddm_net::client()?;
    for (file, want) in FASHION_MNIST_FILES {
        let dest = dir.join(file);
        if dest.exists()
            && read_maybe_gz(&dest)
                .map(|d| sha256_hex(&d) == want)
                .unwrap_or(false)
        {
            continue;
        }
        let url = format!("{}/{file}", base_url.trim_end_matches('/'));
        tracing::info!("downloading {url}");
        let fetch = |url: &str| -> std::result::Result<Vec<u8>, String> {
            use std::io::Read;
            let mut resp = client.get(url).send().map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            progress.begin(file, resp.content_length().unwrap_or(0));
            let (mut bytes, mut chunk) = (vec![], vec![0u8; 1 << 16]);
            loop {
                let n = resp.read(&mut chunk).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&chunk[..n]);
                progress.advance(n as u64);
            }
            progress.finish();
            Ok(bytes)
        };
        let bytes = fetch(&url).map_err(|e| Error::NotFound {
            what: url.clone(),
            hint: e,
        })?;
        let data = gunzip_if_gz(&dest, bytes.clone())?;
        let got = sha256_hex(&data);
        if got != want {
            return Err(Error::Checksum {
                path: PathBuf::from(url),
                expected: want.into(),
                actual: got,
            });
        }
        ddm_core::fsio::write_bytes_atomic(&dest, &bytes)?;
    }
    Ok(())
}
