//! Captions measured from images: each image's class (when labelled) and three attributes read off
//! its pixels — shade (the mean brightness of the object), width (how much of the row the object
//! spans) and size (how much of the image it covers) — said in varied phrasings. Captions then
//! carry more than the class, and a prompt's attributes can be measured on samples the same way
//! ([`Thresholds::label`] on [`measure`]).
//!
//! The object is the set of pixels that differ from the background (the median of the image's
//! border) by more than a tenth of the range. Each attribute is cut into thirds at the dataset's terciles, so
//! "dark" means darker than two thirds of the dataset's objects.

use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Values};
use crate::error::{Error, Result};

/// What one image's pixels say: each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measures {
    /// Mean brightness of the object's pixels.
    pub shade: f32,
    /// The object's mean horizontal extent per row it occupies, over the image's width.
    pub width: f32,
    /// The object's share of the image's pixels.
    pub size: f32,
}

/// Measure one image `[C, S, S]` of bytes (colour as luminance).
pub fn measure(pixels: &[u8], shape: &[usize]) -> Measures {
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    let plane = h * w;
    let luma: Vec<f32> = (0..plane)
        .map(|i| match c {
            3 => {
                (0.299 * pixels[i] as f32
                    + 0.587 * pixels[plane + i] as f32
                    + 0.114 * pixels[2 * plane + i] as f32)
                    / 255.0
            }
            _ => pixels[i] as f32 / 255.0,
        })
        .collect();
    let mut border: Vec<f32> = (0..plane)
        .filter(|i| i / w == 0 || i / w == h - 1 || i % w == 0 || i % w == w - 1)
        .map(|i| luma[i])
        .collect();
    border.sort_by(f32::total_cmp);
    let background = border[border.len() / 2]; // the median: an object touching the border moves it little
    let object: Vec<bool> = luma.iter().map(|&v| (v - background).abs() > 0.1).collect();
    let count = object.iter().filter(|&&o| o).count();
    if count == 0 {
        return Measures {
            shade: background,
            width: 0.0,
            size: 0.0,
        };
    }
    let shade = (0..plane).filter(|&i| object[i]).map(|i| luma[i]).sum::<f32>() / count as f32;
    let spans: Vec<usize> = (0..h)
        .filter_map(|r| {
            let row = &object[r * w..(r + 1) * w];
            let first = row.iter().position(|&o| o)?;
            let last = row.iter().rposition(|&o| o)?;
            Some(last - first + 1)
        })
        .collect();
    let width = spans.iter().sum::<usize>() as f32 / (spans.len() * w) as f32;
    Measures {
        shade,
        width,
        size: count as f32 / plane as f32,
    }
}

/// The words of each attribute, low third to high third.
pub const SHADE: [&str; 3] = ["dark", "mid-tone", "light"];
pub const WIDTH: [&str; 3] = ["narrow", "medium-width", "wide"];
pub const SIZE: [&str; 3] = ["small", "medium-sized", "large"];

/// Where the thirds of each attribute begin: the dataset's terciles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub shade: [f32; 2],
    pub width: [f32; 2],
    pub size: [f32; 2],
}

/// Which third of each attribute an image falls in (0 low, 1 middle, 2 high).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    pub shade: usize,
    pub width: usize,
    pub size: usize,
}

impl Thresholds {
    /// The terciles of every attribute over `measures` (not empty): the values a third and two
    /// thirds of the way up.
    pub fn of(measures: &[Measures]) -> Self {
        let terciles = |f: fn(&Measures) -> f32| {
            let mut v: Vec<f32> = measures.iter().map(f).collect();
            v.sort_by(f32::total_cmp);
            [v[v.len() / 3], v[2 * v.len() / 3]]
        };
        Self {
            shade: terciles(|m| m.shade),
            width: terciles(|m| m.width),
            size: terciles(|m| m.size),
        }
    }

    pub fn label(&self, m: &Measures) -> Attributes {
        let third = |v: f32, [a, b]: [f32; 2]| (v >= a) as usize + (v >= b) as usize;
        Attributes {
            shade: third(m.shade, self.shade),
            width: third(m.width, self.width),
            size: third(m.size, self.size),
        }
    }
}

/// One image's caption and what it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Described {
    pub caption: String,
    /// The class name, when the data is labelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    pub shade: String,
    pub width: String,
    pub size: String,
    pub measures: Measures,
}

/// `a` or `an` before `word`.
fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// One phrasing of `noun` with the attribute words `shade`, `width`, `size`, chosen by `rng`;
/// each phrasing names the noun and at least two of the attributes.
fn phrase(noun: &str, [shade, width, size]: [&str; 3], rng: &mut ChaCha8Rng) -> String {
    let templates: [&dyn Fn() -> String; 6] = [
        &|| format!("{} {shade}, {width} {noun}", article(shade)),
        &|| format!("{} {size} {shade} {noun}", article(size)),
        &|| format!("{noun}, {shade} and {width}"),
        &|| format!("a photo of {} {width}, {size} {noun}", article(width)),
        &|| format!("{} {noun} that is {size} and {shade}", article(noun)),
        &|| format!("{shade} {noun}, {size}, {width}"),
    ];
    templates.choose(rng).expect("six templates")()
}

/// Captions for every image of `data` (images of bytes), phrasings drawn with `seed`; with the
/// thresholds they were cut at (`data`'s own terciles).
pub fn describe(data: &Dataset, seed: u64) -> Result<(Vec<Described>, Thresholds)> {
    describe_with(data, None, seed)
}

/// [`describe`], cut at `thresholds` when given (another set's terciles: prompts made from test
/// images in the words of the training captions), else at `data`'s own.
pub fn describe_with(
    data: &Dataset,
    thresholds: Option<Thresholds>,
    seed: u64,
) -> Result<(Vec<Described>, Thresholds)> {
    let Values::U8(_) = &data.values else {
        return Err(Error::Invalid(format!(
            "{}: captions are measured from images of bytes; this data holds vectors or latents",
            data.name
        )));
    };
    if data.shape.len() != 3 || !matches!(data.shape[0], 1 | 3) || data.shape[1] < 3 || data.shape[2] < 3 {
        return Err(Error::Invalid(format!(
            "{}: samples of shape {:?} are not images [1 or 3, H, W]",
            data.name, data.shape
        )));
    }
    let measures: Vec<Measures> = (0..data.len())
        .map(|i| measure(data.image_bytes(i).expect("byte images"), &data.shape))
        .collect();
    let thresholds = thresholds.unwrap_or_else(|| Thresholds::of(&measures));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let described = measures
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let a = thresholds.label(m);
            let class = data.labels.as_ref().map(|l| class_name(data, l[i]));
            let words = [SHADE[a.shade], WIDTH[a.width], SIZE[a.size]];
            let noun = class.clone().unwrap_or_else(|| "image".into());
            Described {
                caption: phrase(&noun, words, &mut rng),
                class,
                shade: words[0].into(),
                width: words[1].into(),
                size: words[2].into(),
                measures: *m,
            }
        })
        .collect();
    Ok((described, thresholds))
}

/// The class's name as a caption says it (lower case), or `class N`.
fn class_name(data: &Dataset, label: u32) -> String {
    match &data.class_names {
        Some(names) if (label as usize) < names.len() => names[label as usize].to_lowercase(),
        _ => format!("class {label}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8 x 8 image: background `bg`, a block of `value` over rows `r` and columns `c`.
    fn block(bg: u8, value: u8, r: std::ops::Range<usize>, c: std::ops::Range<usize>) -> Vec<u8> {
        (0..64)
            .map(|i| match r.contains(&(i / 8)) && c.contains(&(i % 8)) {
                true => value,
                false => bg,
            })
            .collect()
    }

    #[test]
    fn measures_read_the_object_off_its_background() {
        let m = measure(&block(0, 255, 2..6, 1..7), &[1, 8, 8]);
        assert_eq!(
            m,
            Measures {
                shade: 1.0,
                width: 0.75,
                size: 24.0 / 64.0
            }
        );
        // A dark object on a light background is found too.
        let m = measure(&block(250, 51, 1..7, 3..5), &[1, 8, 8]);
        assert!(
            (m.shade - 0.2).abs() < 1e-6 && m.width == 0.25 && m.size == 12.0 / 64.0,
            "{m:?}"
        );
        // Nothing but background: no object.
        assert_eq!(measure(&[9; 64], &[1, 8, 8]).size, 0.0);
    }

    #[test]
    fn thirds_name_the_attributes_and_captions_say_them() {
        let images = [
            block(0, 60, 2..6, 3..5),
            block(0, 150, 1..7, 2..6),
            block(0, 250, 0..8, 1..7),
        ];
        let data = Dataset {
            name: "blocks".into(),
            shape: vec![1, 8, 8],
            values: Values::U8(images.concat()),
            labels: Some(vec![0, 1, 0]),
            num_classes: Some(2),
            class_names: Some(vec!["Ankle boot".into(), "Bag".into()]),
            mixture: None,
            cond: None,
            tokens: None,
            latent: None,
            text: None,
        };
        let (d, _) = describe(&data, 7).unwrap();
        let words: Vec<[&str; 3]> = d
            .iter()
            .map(|d| [d.shade.as_str(), d.width.as_str(), d.size.as_str()])
            .collect();
        assert_eq!(
            words,
            vec![
                ["dark", "narrow", "small"],
                ["mid-tone", "medium-width", "medium-sized"],
                ["light", "wide", "large"]
            ]
        );
        for x in &d {
            let c = x.class.as_deref().unwrap();
            assert!(x.caption.contains(c), "{x:?}");
            let said = [&x.shade, &x.width, &x.size]
                .iter()
                .filter(|w| x.caption.contains(w.as_str()))
                .count();
            assert!(said >= 2, "{x:?}");
        }
        assert_eq!(d[0].class.as_deref(), Some("ankle boot"));
        // The same seed, the same captions.
        assert_eq!(describe(&data, 7).unwrap().0, d);
    }
}
