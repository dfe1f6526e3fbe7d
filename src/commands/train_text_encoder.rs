//! `ddm train-text-encoder`: a CLIP text tower trained contrastively on captioned images, for
//! captions without a pretrained encoder.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ddm_trainer::text_encoder::{DEFAULT_MODEL, TextEncoderTask};

use super::settings::{TrainSettings, run_task};

/// Train a text encoder (transformers' CLIPTextModel over a word-level tokenizer of the captions'
/// vocabulary) contrastively against a small image tower on the pixels, as CLIP is trained: each
/// image's caption found among the batch's captions and each caption's image among its images.
/// Writes OUT/text-encoder.safetensors, a text encoder like an imported one (`ddm encode-text
/// --encoder`), with its tokenizer and its caption -> image retrieval accuracy. Users with a
/// pretrained CLIP import it instead: `ddm import --from transformers-clip DIR`.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct TrainTextEncoderArgs {
    /// The images the captions describe (any `--data` source).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// The captions, one per sample in order: a .jsonl file (a `caption` or `text` field a line)
    /// or plain text (one caption a line). Without it, --data's own captions (an image folder's
    /// captions.jsonl, or a NAME.txt beside each image).
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Training settings; --model is `clip:WIDTH:LAYERS:HEADS` (default clip:128:2:4); unset ones
    /// default to 1500 steps of batch 256, lr 1e-3.
    #[command(flatten)]
    pub settings: TrainSettings,
}

const EXAMPLES: &str = "Examples:
  ddm data captions --data fashion-mnist --out captions.jsonl
  ddm train-text-encoder --data fashion-mnist --captions captions.jsonl --out text-encoder
  ddm encode-text --encoder text-encoder/text-encoder.safetensors --captions captions.jsonl --data fashion-mnist --out train.safetensors
  ddm train-text-encoder --data images:captioned-photos@64 --model clip:256:4:4 --steps 5000 --out text-encoder";

pub fn run(args: TrainTextEncoderArgs) -> anyhow::Result<u8> {
    let mut s = args.settings.clone();
    s.model.get_or_insert(DEFAULT_MODEL.into());
    s.steps.get_or_insert(1500);
    s.batch_size.get_or_insert(256);
    s.lr.get_or_insert(1e-3);
    let config = s.resolve_config()?;
    if config.objective != ddm_core::checkpoint::Objective::Velocity || config.class_conditional {
        anyhow::bail!(
            "`objective` and --class-conditional are an expert's settings: a text encoder has none"
        );
    }
    let source = ddm_datasets::parse_source(&args.data, true)?;
    let captions = match &args.captions {
        Some(path) => ddm_datasets::captions::read_captions(path)?,
        None => source.captions()?.with_context(|| {
            format!(
                "{} has no captions of its own (a captions.jsonl, or a NAME.txt beside each image): pass --captions FILE",
                source.describe()
            )
        })?,
    };
    let data = source
        .load()
        .with_context(|| format!("loading {}", source.describe()))?;
    let tokenizer = ddm_core::tokenizer::word_level(&captions, None)?;
    println!(
        "{} captions: {} words in the vocabulary, sequences of {} tokens",
        captions.len(),
        tokenizer.vocab_size() - 3,
        tokenizer.length()
    );
    let task = TextEncoderTask::new(data, captions, tokenizer).with_context(|| match &args.captions {
        Some(p) => p.display().to_string(),
        None => "the captions".into(),
    })?;
    run_task(&task, &s, config, &args.out)
}
