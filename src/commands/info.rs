//! `ddm info`: what a checkpoint holds.

use std::path::PathBuf;

use clap::Args;
use ddm_core::checkpoint::Checkpoint;

/// Print a checkpoint's metadata (role, model, data, objective, provenance, training summary)
/// after verifying its checksum.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  ddm info expert-0/expert.safetensors")]
pub struct InfoArgs {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Print the metadata as JSON only.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let ckpt = Checkpoint::read(&args.checkpoint)?;
    let json = serde_json::to_string_pretty(&ckpt.meta)?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let params: usize = ckpt.tensors.values().map(|t| t.numel()).sum();
    println!("{}", args.checkpoint.display());
    println!("  role        {}", ckpt.meta.role);
    println!(
        "  model       {} ({params} parameters in {} tensors)",
        ckpt.meta.model.arch(),
        ckpt.tensors.len()
    );
    println!(
        "  data        {:?} in {:?}",
        ckpt.meta.data.shape, ckpt.meta.data.range
    );
    if let Some(space) = ckpt.latent_space().or_else(|| ckpt.meta.latent.clone()) {
        println!(
            "  latents     {:?} of images {:?}, {}",
            space.latent_shape,
            space.image_shape,
            space.describe()
        );
    }
    println!("  objective   {}", ckpt.meta.objective);
    println!("  GFLOPs/fwd  {:.3}", ckpt.meta.model.flops_per_sample() / 1e9);
    println!("  sha256      {} (verified)", ckpt.meta.tensors_sha256);
    println!("metadata:\n{json}");
    Ok(())
}
