//! `ddm data`: look at and fetch datasets.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Inspect or download datasets.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm data info --data fashion-mnist:test --png first-64.png\n  ddm data fetch --dir ~/data/fashion-mnist\n  ddm data captions --data fashion-mnist --out captions.jsonl"
)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Load a dataset and print its size, shape, labels and fingerprint.
    Info {
        /// The data (same forms as `ddm partition --data`).
        #[arg(long, default_value = "default")]
        data: String,
        /// Also write a PNG grid of the first 64 samples (images only).
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Caption every image from what it shows: its class (when labelled) and its shade, width and
    /// size measured from its pixels (each cut into thirds at the dataset's terciles), in varied
    /// phrasings. Writes a .jsonl file (`caption`, `class`, `shade`, `width`, `size`, `measures`)
    /// that `ddm encode-text --captions` reads.
    Captions {
        /// The images (same forms as `ddm partition --data`).
        #[arg(long, default_value = "default")]
        data: String,
        /// The .jsonl file to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the phrasings.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Download Fashion-MNIST into the cache ($DDM_CACHE, else ~/.cache/ddm), verifying sha256 sums.
    Fetch {
        /// Directory to download into (default: the cache).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Mirror base URL.
        #[arg(long, default_value = ddm_datasets::idx::FASHION_MNIST_MIRROR)]
        mirror: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Info { data, png } => {
            let source = ddm_datasets::parse_source(&data, false)?;
            let d = source.load()?;
            let info = d.info();
            println!("{}", source.describe());
            println!("  samples      {}", info.len);
            println!("  shape        {:?} ({})", info.shape, info.dtype);
            println!("  range        {:?}", info.range);
            if let Some(k) = info.num_classes {
                println!(
                    "  classes      {k}{}",
                    info.class_names
                        .map(|n| format!(": {}", n.join(", ")))
                        .unwrap_or_default()
                );
            }
            println!("  fingerprint  {}", info.fingerprint);
            if let Some(png) = png {
                if info.dtype != "u8" || info.shape.len() != 3 {
                    anyhow::bail!(
                        "--png needs image data; {} has samples of shape {:?}",
                        info.name,
                        info.shape
                    );
                }
                let cells: Vec<Option<&[u8]>> = (0..d.len().min(64)).map(|i| d.image_bytes(i)).collect();
                let s = &info.shape;
                ddm_core::grid::write_grid_png(&png, &cells, [s[0], s[1], s[2]], 8, 2, 40)?;
                println!("  grid         {}", png.display());
            }
        }
        DataCommand::Captions { data, out, seed } => write_captions(&data, &out, seed)?,
        DataCommand::Fetch { dir, mirror, quiet } => {
            let dir = dir.unwrap_or_else(|| ddm_core::env::cache_dir().join("fashion-mnist"));
            ddm_datasets::idx::download_fashion_mnist(&mirror, &dir, &crate::ui::Bar::new(quiet))?;
            println!("Fashion-MNIST is in {} (sha256 verified)", dir.display());
        }
    }
    Ok(())
}

/// `ddm data captions`: measure, phrase, write, and show what was written.
fn write_captions(data: &str, out: &std::path::Path, seed: u64) -> anyhow::Result<()> {
    let d = ddm_eval::load_data(data, true)?;
    ddm_core::fsio::check_writable(out)?;
    let (described, t) = ddm_datasets::describe::describe(&d, seed)?;
    let mut text = String::new();
    for x in &described {
        text.push_str(&serde_json::to_string(x)?);
        text.push('\n');
    }
    ddm_core::fsio::write_bytes_atomic(out, text.as_bytes())?;
    println!(
        "wrote {} ({} captions of {})",
        out.display(),
        described.len(),
        d.name
    );
    println!(
        "  thirds cut at: shade {:.3} / {:.3}, width {:.3} / {:.3}, size {:.3} / {:.3}",
        t.shade[0], t.shade[1], t.width[0], t.width[1], t.size[0], t.size[1]
    );
    for x in described.iter().take(4) {
        println!("  {}", x.caption);
    }
    Ok(())
}
