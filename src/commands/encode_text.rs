//! `ddm encode-text`: captions -> text conditioning (pooled vectors, and token states with their
//! mask), optionally joined to the samples they describe as one `tensors:` dataset.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, Role};
use ddm_core::clip::ClipTextModel;
use ddm_core::host::{HostTensor, RawTensor};
use ddm_core::progress::Progress;
use ddm_core::tokenizer::TextTokenizer;
use ddm_datasets::tensors::{CLASS_NAMES_KEY, LATENT_KEY, TEXT_SPACE_KEY};
use ddm_datasets::{Dataset, Values};

use super::DeviceArgs;

/// Encode captions with a text encoder. Writes a safetensors file with `c` `[N, D]` (each
/// caption's pooled vector: what a vector-conditioned router reads), with --tokens also
/// `c_tokens` `[N, L, D]` and `c_mask` `[N, L]` (1 at tokens, 0 at padding), and the text space
/// (which encoder, D, L) in its metadata. With --data, the samples (`x`, and `y` when labelled)
/// are written beside them, caption i with sample i: a `tensors:` dataset to partition and train on.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct EncodeTextArgs {
    /// The text encoder: a ddm text-encoder checkpoint (`ddm import --from transformers-clip`).
    #[arg(long)]
    pub encoder: PathBuf,
    /// The captions, one per sample in order: a .jsonl file (a `caption` or `text` field a line)
    /// or plain text (one caption a line). Without it, --data's own captions (an image folder's
    /// captions.jsonl, or a NAME.txt beside each image).
    #[arg(long, required_unless_present = "data")]
    pub captions: Option<PathBuf>,
    /// The samples the captions describe (any `--data` source), written beside them.
    #[arg(long)]
    pub data: Option<String>,
    /// Also write each caption's token states and mask (what experts that attend to text read).
    #[arg(long)]
    pub tokens: bool,
    /// The tensors file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Captions per forward pass.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH), default_value_t = 256)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const EXAMPLES: &str = "Examples:
  ddm import --from transformers-clip clip-text/ --out text-encoder.safetensors
  ddm encode-text --encoder text-encoder.safetensors --captions captions.jsonl --out text.safetensors
  ddm encode-text --encoder text-encoder.safetensors --captions captions.txt --data fashion-mnist --tokens --out train.safetensors
  ddm encode-text --encoder text-encoder.safetensors --data images:laion-part@64 --out train.safetensors   # NAME.txt beside each image";

/// What the encoder gives for every caption, on the host.
struct Encoded {
    pooled: Vec<f32>,
    tokens: Vec<f32>,
    mask: Vec<f32>,
}

pub fn run(args: EncodeTextArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let ckpt = Checkpoint::read(&args.encoder)?;
    if ckpt.meta.role != Role::TextEncoder {
        bail!(
            "{}: a checkpoint of role {}; --encoder takes a text encoder (ddm import --from transformers-clip)",
            args.encoder.display(),
            ckpt.meta.role
        );
    }
    let (encoder, tokenizer) = ckpt.text_encoder(&args.encoder, &device)?;
    let space = ckpt.text_space().expect("a text encoder has a text space");
    let source = args
        .data
        .as_deref()
        .map(|s| ddm_datasets::parse_source(s, true))
        .transpose()?;
    let captions = match (&args.captions, &source) {
        (Some(path), _) => ddm_datasets::captions::read_captions(path)?,
        (None, Some(s)) => s.captions()?.with_context(|| {
            format!(
                "{} has no captions of its own (a captions.jsonl, or a NAME.txt beside each image): pass --captions FILE",
                s.describe()
            )
        })?,
        (None, None) => unreachable!("clap requires --captions or --data"),
    };
    let n = captions.len();
    let data = match &source {
        Some(s) => Some(s.load().with_context(|| format!("loading {}", s.describe()))?),
        None => None,
    };
    if let (Some(d), Some(path)) = (&data, &args.captions)
        && d.len() != n
    {
        bail!(
            "{} has {n} captions, but {} has {} samples: caption i describes sample i",
            path.display(),
            d.name,
            d.len()
        );
    }
    ddm_core::fsio::check_writable(&args.out)?;
    let encoded = encode_all(&args, &encoder, &tokenizer, &captions, &device)?;
    let (d, l) = (space.dim, space.length);
    let mut tensors = BTreeMap::from([(
        "c".to_string(),
        RawTensor::f32(&HostTensor::new(vec![n, d], encoded.pooled)),
    )]);
    if args.tokens {
        tensors.insert(
            "c_tokens".into(),
            RawTensor::f32(&HostTensor::new(vec![n, l, d], encoded.tokens)),
        );
        tensors.insert(
            "c_mask".into(),
            RawTensor::f32(&HostTensor::new(vec![n, l], encoded.mask)),
        );
    }
    let mut md = HashMap::from([(
        TEXT_SPACE_KEY.to_string(),
        ddm_core::json::to_string("the text space", &space)?,
    )]);
    if let Some(d) = &data {
        add_samples(d, &mut tensors, &mut md)?;
    }
    let bytes = ddm_core::host::raw_to_safetensors_bytes(&tensors, Some(md))?;
    ddm_core::fsio::write_bytes_atomic(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({n} captions -> c [{n}, {d}]{}{}; {})",
        args.out.display(),
        match args.tokens {
            true => format!(", c_tokens [{n}, {l}, {d}], c_mask [{n}, {l}]"),
            false => String::new(),
        },
        match &data {
            Some(d) => format!(", with the samples of {}", d.name),
            None => String::new(),
        },
        space.describe()
    );
    Ok(())
}

/// Tokenize and encode every caption, `--batch-size` at a time.
fn encode_all(
    args: &EncodeTextArgs,
    encoder: &ClipTextModel,
    tokenizer: &TextTokenizer,
    captions: &[String],
    device: &Device,
) -> anyhow::Result<Encoded> {
    let mut out = Encoded {
        pooled: Vec::new(),
        tokens: Vec::new(),
        mask: Vec::new(),
    };
    let bar = crate::ui::Bar::new(args.quiet);
    bar.begin("encode captions", captions.len() as u64);
    for chunk in captions.chunks(args.batch_size) {
        let batch = tokenizer.encode(chunk)?;
        let (ids, mask) = batch.to_tensors(device);
        let e = encoder.forward(ids, mask);
        out.pooled.extend(HostTensor::from_tensor(e.pooled).data);
        if args.tokens {
            out.tokens.extend(HostTensor::from_tensor(e.tokens).data);
            out.mask.extend(batch.mask);
        }
        bar.advance(chunk.len() as u64);
    }
    bar.finish();
    let bad = out
        .pooled
        .iter()
        .chain(&out.tokens)
        .filter(|v| !v.is_finite())
        .count();
    if bad > 0 {
        bail!(
            "{}: the encoder gave {bad} NaN or infinite values",
            args.encoder.display()
        );
    }
    Ok(out)
}

/// The samples (`x`, `y`), their class names and latent space, beside the text.
fn add_samples(
    d: &Dataset,
    tensors: &mut BTreeMap<String, RawTensor>,
    md: &mut HashMap<String, String>,
) -> anyhow::Result<()> {
    if d.cond.is_some() {
        bail!(
            "{} carries conditioning vectors `c` already: encode the captions of its samples without them",
            d.name
        );
    }
    let mut shape = vec![d.len()];
    shape.extend(&d.shape);
    let x = match &d.values {
        Values::U8(v) => RawTensor::u8(shape, v.clone()),
        Values::F32(v) => RawTensor::f32(&HostTensor::new(shape, v.clone())),
    };
    tensors.insert("x".into(), x);
    if let Some(labels) = &d.labels {
        let y: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        tensors.insert("y".into(), RawTensor::i64(vec![y.len()], &y));
    }
    if let Some(names) = &d.class_names {
        md.insert(CLASS_NAMES_KEY.into(), serde_json::to_string(names)?);
    }
    if let Some(space) = &d.latent {
        md.insert(
            LATENT_KEY.into(),
            ddm_core::json::to_string("the latent space", space)?,
        );
    }
    Ok(())
}
