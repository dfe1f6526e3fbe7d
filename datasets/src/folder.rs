//! A folder of PNG/JPEG images, resized (shorter side) and centre-cropped to `size x size`.
//! If the folder has sub-directories, each is a class (sorted by name) and its images carry that
//! label; otherwise the images are unlabelled. Grayscale output if every image is grayscale.
//! Captions, when the folder has them: a `captions.jsonl` at its top (each line's `file`, relative
//! to the folder, and `caption`) or a `NAME.txt` beside each image (webdataset's and LAION's
//! layout); see [`crate::captions::of_images`].

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use crate::dataset::{Dataset, Source, Values};
use crate::error::{Error, Result};

pub struct ImageFolder {
    pub dir: PathBuf,
    pub size: usize,
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// The class directories (sorted; none for an unlabelled folder) and every image with its label,
/// in the order samples are loaded.
type Listing = (Vec<PathBuf>, Vec<(PathBuf, Option<u32>)>);

impl ImageFolder {
    fn list(&self) -> Result<Listing> {
        let entries = sorted_entries(&self.dir)?;
        let classes: Vec<PathBuf> = entries.iter().filter(|p| p.is_dir()).cloned().collect();
        let mut files: Vec<(PathBuf, Option<u32>)> = vec![];
        if classes.is_empty() {
            files.extend(entries.into_iter().filter(|p| is_image(p)).map(|p| (p, None)));
        } else {
            for (k, c) in classes.iter().enumerate() {
                files.extend(
                    sorted_entries(c)?
                        .into_iter()
                        .filter(|p| is_image(p))
                        .map(|p| (p, Some(k as u32))),
                );
            }
        }
        if files.is_empty() {
            return Err(Error::bad(&self.dir, "no .png, .jpg or .jpeg images found"));
        }
        Ok((classes, files))
    }
}

impl Source for ImageFolder {
    fn describe(&self) -> String {
        format!("images ({}, {}x{})", self.dir.display(), self.size, self.size)
    }

    fn captions(&self) -> Result<Option<Vec<String>>> {
        let (_, files) = self.list()?;
        let images: Vec<PathBuf> = files.into_iter().map(|(p, _)| p).collect();
        crate::captions::of_images(&self.dir, &images)
    }

    fn load(&self) -> Result<Dataset> {
        let (classes, files) = self.list()?;
        let s = self.size as u32;
        let mut images = Vec::with_capacity(files.len());
        let mut all_gray = true;
        for (p, _) in &files {
            let img = image::open(p).map_err(|e| Error::bad(p, format!("unreadable image: {e}")))?;
            all_gray &= !img.color().has_color();
            let img = img.resize_to_fill(s, s, FilterType::Triangle);
            images.push(img);
        }
        let channels = if all_gray { 1 } else { 3 };
        let per = channels * self.size * self.size;
        let mut pixels = Vec::with_capacity(files.len() * per);
        for img in images {
            if channels == 1 {
                pixels.extend(img.to_luma8().into_raw());
            } else {
                // HWC -> CHW
                let rgb = img.to_rgb8().into_raw();
                for c in 0..3 {
                    pixels.extend(rgb.iter().skip(c).step_by(3));
                }
            }
        }
        let labels: Option<Vec<u32>> = if classes.is_empty() {
            None
        } else {
            Some(files.iter().map(|f| f.1.unwrap_or(0)).collect())
        };
        Ok(Dataset {
            name: format!("images:{}", self.dir.display()),
            shape: vec![channels, self.size, self.size],
            values: Values::U8(pixels),
            num_classes: labels.as_ref().map(|_| classes.len()),
            class_names: labels.as_ref().map(|_| {
                classes
                    .iter()
                    .map(|c| c.file_name().unwrap_or_default().to_string_lossy().into_owned())
                    .collect()
            }),
            labels,
            mixture: None,
            latent: None,
            text: None,
            cond: None,
            tokens: None,
        })
    }
}
