//! The text setting's condition. Every training image gets a caption measured from its pixels
//! (its class, and two or three of shade, width and size: `ddm data captions`); a text encoder is
//! trained contrastively on those captions inside the run (`ddm train-text-encoder`); each
//! caption's pooled vector becomes the image's condition `c`, which experts read through adaLN and
//! the text router beside x_t. The samples are asked for prompts made the same way from test images
//! (class-balanced: prompt i describes a test image of class i mod C), and judged on whether they
//! show the prompted class (the evaluation classifier) and the prompted attributes (measured on the
//! samples as on the data).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::checkpoint::Checkpoint;
use ddm_core::host::HostTensor;
use ddm_datasets::Dataset;
use ddm_datasets::describe::{self, Described, Thresholds};
use ddm_trainer::config::TrainConfig;
use ddm_trainer::text_encoder::{TEXT_ENCODER_FILE, TextEncoderTask};
use serde::{Deserialize, Serialize};

use super::Setting;
use crate::classifier::FeatureNet;

/// Where the setting's text encoder is trained, under the setting's directory.
pub const ENCODER_DIR: &str = "train/text-encoder";

/// Captions encoded per forward pass.
const ENCODE_BATCH: usize = 1024;

/// What the N samples are asked for: sample i reads prompt i.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub captions: Vec<String>,
    /// The prompts' pooled vectors `[N, D]`.
    pub vectors: HostTensor,
    /// The class each prompt names.
    pub classes: Vec<u32>,
    /// The third (0 low, 1 middle, 2 high) of shade, width and size each prompt says; None where
    /// its phrasing leaves the attribute out.
    pub said: Vec<[Option<usize>; 3]>,
    /// Where the training captions cut each attribute into thirds.
    pub thresholds: Thresholds,
    /// Caption -> image top-1 of the text encoder among 256 training pairs.
    pub retrieval_top1: f64,
    /// The test images the prompts describe (indices into the reference set).
    pub sources: Vec<usize>,
}

/// How well N samples show their prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Adherence {
    /// Samples the evaluation classifier assigns the prompted class.
    pub class: f64,
    /// Prompted attributes (shade, width, size, each where the prompt says it) found on the
    /// samples, measured as on the data; chance is about 1/3.
    pub attributes: f64,
}

/// Caption `data` (its terciles), train the setting's text encoder on the captions (resuming a
/// run that was cut short), and put every caption's pooled vector into `data.cond` with the
/// encoder's text space; then the N class-balanced prompts made from `reference`'s images.
pub fn prepare(
    setting: &Setting,
    dir: &Path,
    encoder_config: &TrainConfig,
    data: &mut Dataset,
    reference: &Dataset,
) -> anyhow::Result<Prompts> {
    let (described, thresholds) = describe::describe(data, setting.seed)?;
    let captions: Vec<String> = described.into_iter().map(|d| d.caption).collect();
    let path = train_encoder(setting, dir, encoder_config, data, &captions)?;
    let ckpt = Checkpoint::read(&path)?;
    let device = ddm_core::device::device(setting.device)?;
    let (encoder, tokenizer) = ckpt.text_encoder(&path, &device)?;
    tracing::info!("encoding {} training captions", captions.len());
    data.cond = Some(encoder.encode_pooled(&tokenizer, &captions, ENCODE_BATCH)?);
    data.text = ckpt.text_space();
    let classes = balanced_classes(setting.n, reference)?;
    let picked = balanced_prompts(reference, thresholds, &classes, setting.seed)?;
    let prompt_captions: Vec<String> = picked.iter().map(|(_, d)| d.caption.clone()).collect();
    let said = picked.iter().map(|(_, d)| said_attributes(d)).collect();
    Ok(Prompts {
        vectors: encoder.encode_pooled(&tokenizer, &prompt_captions, ENCODE_BATCH)?,
        captions: prompt_captions,
        sources: picked.iter().map(|(i, _)| *i).collect(),
        classes,
        said,
        thresholds,
        retrieval_top1: ckpt
            .meta
            .extra
            .get("retrieval_top1")
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NAN),
    })
}

/// Train (or finish) the text encoder on `data` and its captions; returns its checkpoint.
fn train_encoder(
    setting: &Setting,
    dir: &Path,
    config: &TrainConfig,
    data: &Dataset,
    captions: &[String],
) -> anyhow::Result<PathBuf> {
    let tokenizer = ddm_core::tokenizer::word_level(captions, None)?;
    let task = TextEncoderTask::new(data.clone(), captions.to_vec(), tokenizer)?;
    let out = dir.join(ENCODER_DIR);
    super::stages::train_to(setting, &task, &out, config.clone())?;
    Ok(out.join(TEXT_ENCODER_FILE))
}

/// The classes of N class-balanced samples: sample i is class i mod C.
fn balanced_classes(n: usize, reference: &Dataset) -> anyhow::Result<Vec<u32>> {
    let classes = reference.num_classes.with_context(|| {
        format!(
            "{}: the text setting's prompts need labelled test images",
            reference.name
        )
    })?;
    Ok((0..n).map(|i| (i % classes) as u32).collect())
}

/// The captions of test images (with their indices) for samples of `classes` (i mod C): prompt i
/// describes the (i / C)-th image of its class, in the words (thresholds) of the training captions.
fn balanced_prompts(
    reference: &Dataset,
    thresholds: Thresholds,
    classes: &[u32],
    seed: u64,
) -> anyhow::Result<Vec<(usize, Described)>> {
    let labels = reference.labels.as_ref().with_context(|| {
        format!(
            "{}: the text setting's prompts need labelled test images",
            reference.name
        )
    })?;
    let (described, _) = describe::describe_with(reference, Some(thresholds), seed + 1)?;
    let mut of_class: Vec<Vec<usize>> = vec![vec![]; reference.num_classes.unwrap_or(0)];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(list) = of_class.get_mut(l as usize) {
            list.push(i);
        }
    }
    let mut out = Vec::with_capacity(classes.len());
    for (i, &c) in classes.iter().enumerate() {
        let nth = i / of_class.len();
        let Some(&at) = of_class[c as usize].get(nth) else {
            bail!(
                "{} has fewer than {} images of class {c}: lower --n",
                reference.name,
                nth + 1
            );
        };
        out.push((at, described[at].clone()));
    }
    Ok(out)
}

/// Which third of each attribute a caption says (None where its phrasing leaves it out).
fn said_attributes(d: &Described) -> [Option<usize>; 3] {
    let third = |word: &str, words: [&str; 3]| {
        d.caption
            .contains(word)
            .then(|| words.iter().position(|w| *w == word))
            .flatten()
    };
    [
        third(&d.shade, describe::SHADE),
        third(&d.width, describe::WIDTH),
        third(&d.size, describe::SIZE),
    ]
}

/// How well `samples` (`[N, C, H, W]` flattened, in [-1, 1]) show `prompts`.
pub fn adherence(
    prompts: &Prompts,
    samples: &[f32],
    shape: &[usize],
    net: &FeatureNet,
) -> anyhow::Result<Adherence> {
    let n = prompts.classes.len();
    let per: usize = shape.iter().product();
    if samples.len() != n * per {
        bail!("{} sample values for {n} prompts of {per} values", samples.len());
    }
    let predicted = net.predict(samples)?;
    let class = predicted
        .iter()
        .zip(&prompts.classes)
        .filter(|(p, c)| p == c)
        .count() as f64
        / n as f64;
    let pixels = ddm_core::grid::to_u8(samples);
    let (mut hits, mut asked) = (0usize, 0usize);
    for (i, said) in prompts.said.iter().enumerate() {
        let m = describe::measure(&pixels[i * per..(i + 1) * per], shape);
        let found = prompts.thresholds.label(&m);
        for (want, got) in said.iter().zip([found.shade, found.width, found.size]) {
            if let Some(want) = want {
                asked += 1;
                hits += (*want == got) as usize;
            }
        }
    }
    Ok(Adherence {
        class,
        attributes: hits as f64 / asked.max(1) as f64,
    })
}
