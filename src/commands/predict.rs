//! `ddm predict`: run a checkpoint on tensors from a file.
//!
//! Input: a safetensors file with `x_t` `[N, ...]` (the model's data shape), `t` `[N]` (flow time in
//! [0, 1], t = 0 data) and, for class-conditional models, `y` `[N]` (int; the null class is
//! `num_classes`); for models that read them, `c` `[N, Dc]` or `c_tokens` `[N, L, Dt]` with
//! `c_mask` `[N, L]` (absent: the null condition). Output: a safetensors file with `v`, the
//! velocity, or a router's `logits`. Epsilon experts are converted to velocity (see
//! `ddm_core::flow::EpsilonToVelocity`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{self, Objective, Role};
use ddm_core::condition::Condition;
use ddm_core::flow::{EpsilonToVelocity, VelocityField};
use ddm_core::host::{HostTensor, TensorFile, write_tensors};
use ddm_core::model::check_data_shape;
use ddm_router::net::RouterInputs;

use super::DeviceArgs;

/// Evaluate a checkpoint on inputs from a file (for debugging and for comparing with other
/// frameworks). Experts write the velocity `v`; routers write cluster `logits` [N, K] (a
/// conditioned router reads `y`, or routes without the class when it is absent; `c` [N, Dc] or
/// `c_tokens` [N, L, Dt] with `c_mask` [N, L] for a router that reads vectors or tokens).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm predict --checkpoint expert.safetensors --input batch.safetensors --out v.safetensors\n  ddm predict --checkpoint router/router.safetensors --input batch.safetensors --out logits.safetensors"
)]
pub struct PredictArgs {
    /// The checkpoint (`ddm import`, or a trained expert).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Input tensors: `x_t` [N, ...], `t` [N] and optionally `y` [N] (int), `c` [N, Dc], or
    /// `c_tokens` [N, L, Dt] with `c_mask` [N, L].
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the output tensors (`v`).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let ckpt = checkpoint::Checkpoint::read(&args.checkpoint)?;
    let meta = ckpt.meta.clone();
    let input = TensorFile::read(&args.input)?;
    let x = input.f32("x_t")?;
    let t = input.f32("t")?;
    let what = format!("{}: `x_t`", args.input.display());
    check_data_shape(&meta.model, &x.shape, &what)?;
    let n = x.shape[0];
    if n == 0 {
        bail!(
            "{}: `x_t` has no rows (shape {:?})",
            args.input.display(),
            x.shape
        );
    }
    if t.shape != [n] {
        bail!(
            "{}: `t` has shape {:?}, expected [{n}] (one time per sample)",
            args.input.display(),
            t.shape
        );
    }
    let y = match input.contains("y") {
        true => Some(class_ids(&input, &args.input, &meta.model, n, &device)?),
        false => None,
    };

    // Work on [N, X] whatever the data's rank; the model reshapes to what it needs.
    let x_t = HostTensor::new(vec![n, x.numel() / n.max(1)], x.data).to_tensor::<2>(&device);
    let t = t.to_tensor::<1>(&device);
    if meta.role == Role::Router {
        // A router: cluster logits for each sample.
        let k = meta.num_clusters.unwrap_or(0);
        let net = ddm_router::net::RouterNet::from_checkpoint(&args.checkpoint, ckpt, &device)?;
        if y.is_none() && !net.routes_without_class() {
            bail!(
                "{}: the router is conditioned on the class and has no null class; give `y` in {}",
                args.checkpoint.display(),
                args.input.display()
            );
        }
        let c = condition(&input, &args.input, y, net.inputs(), n, &device)?;
        let logits = HostTensor::from_tensor(net.logits(x_t, t, &c));
        write_tensors(
            &args.out,
            &BTreeMap::from([("logits".to_string(), logits)]),
            &BTreeMap::new(),
        )?;
        println!(
            "wrote {} (logits over K = {k} clusters for {n} samples)",
            args.out.display()
        );
        return Ok(());
    }
    let reads = RouterInputs {
        vector: Some(meta.model.condition_dim()).filter(|&d| d > 0),
        tokens: Some(meta.model.token_dim()).filter(|&d| d > 0),
    };
    let c = condition(&input, &args.input, y, reads, n, &device)?;
    let model = ckpt.model(&args.checkpoint, &device)?;
    let v = match meta.objective {
        Objective::Velocity => model.velocity(x_t, t, &c)?,
        Objective::Epsilon { schedule } => {
            EpsilonToVelocity::new(&model, schedule, meta.data.range).velocity(x_t, t, &c)?
        }
    };
    let v = HostTensor::new(x.shape, HostTensor::from_tensor(v).data);
    write_tensors(
        &args.out,
        &BTreeMap::from([("v".to_string(), v)]),
        &BTreeMap::new(),
    )?;
    println!("wrote {} (v for {n} samples)", args.out.display());
    Ok(())
}

/// The class ids `y` `[n]` of the input file, each one the model knows (the null class only in a
/// model trained with label dropout).
fn class_ids(
    input: &TensorFile,
    file: &std::path::Path,
    model: &ddm_core::model::ModelConfig,
    n: usize,
    device: &Device,
) -> anyhow::Result<Tensor<1, Int>> {
    let y = input.i64("y")?;
    let classes = model.num_classes();
    if y.shape != [n] {
        bail!("{}: `y` has shape {:?}, expected [{n}]", file.display(), y.shape);
    }
    if classes == 0 {
        bail!(
            "{}: has `y`, but the model is not class-conditional",
            file.display()
        );
    }
    let last = classes - usize::from(!model.has_null_class());
    if let Some(bad) = y.data.iter().find(|&&c| c < 0 || c as usize > last) {
        bail!(
            "{}: class id {bad} out of range 0..={last}{}",
            file.display(),
            if last < classes {
                " (this model has no null class: it was trained without label dropout)"
            } else {
                ""
            }
        );
    }
    Ok(Tensor::<1, Int>::from_data(TensorData::new(y.data, [n]), device))
}

/// The condition of the input file's `n` samples: the classes `y`, and the vectors `c` `[n, Dc]`
/// and token sequences `c_tokens` `[n, L, Dt]` + `c_mask` `[n, L]` where the file has them, each
/// checked against what the model `reads` (absent: the model reads its null condition).
fn condition(
    input: &TensorFile,
    file: &std::path::Path,
    y: Option<Tensor<1, Int>>,
    reads: RouterInputs,
    n: usize,
    device: &Device,
) -> anyhow::Result<Condition> {
    let vector = match input.contains("c") {
        false => None,
        true => {
            let c = input.f32("c")?;
            if reads.vector.is_none() || c.shape != [n, reads.vector.unwrap_or(0)] {
                bail!(
                    "{}: `c` has shape {:?}, but the model reads {}",
                    file.display(),
                    c.shape,
                    reads
                        .vector
                        .map_or("no conditioning vectors".to_string(), |d| format!("[{n}, {d}]"))
                );
            }
            Some(c.to_tensor::<2>(device))
        }
    };
    let tokens = match ddm_datasets::dataset::TokenSequences::read(input, file, n)? {
        None => None,
        Some(s) => {
            let width = s.embeddings.shape[2];
            if reads.tokens != Some(width) {
                bail!(
                    "{}: `c_tokens` holds token states of width {width}, but the model reads {}",
                    file.display(),
                    reads
                        .tokens
                        .map_or("no token sequences".to_string(), |d| format!("width {d}"))
                );
            }
            Some(s.to_tensors(device))
        }
    };
    Ok(Condition {
        class: y,
        vector,
        tokens,
    })
}
