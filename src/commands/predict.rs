//! `ddm predict`: run a checkpoint on tensors from a file.
//!
//! Input: a safetensors file with `x_t` `[N, ...]` (the model's data shape), `t` `[N]` (flow time in
//! [0, 1], t = 0 data) and, for class-conditional models, `y` `[N]` (int; the null class is
//! `num_classes`). Output: a safetensors file with `v`, the velocity. Epsilon experts are converted
//! to velocity (see `ddm_core::flow::EpsilonToVelocity`).

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

use super::DeviceArgs;

/// Evaluate a checkpoint on inputs from a file (for debugging and for comparing with other
/// frameworks). Experts write the velocity `v`; routers write cluster `logits` [N, K] (a
/// conditioned router reads `y`, or routes without the class when it is absent).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm predict --checkpoint expert.safetensors --input batch.safetensors --out v.safetensors\n  ddm predict --checkpoint router/router.safetensors --input batch.safetensors --out logits.safetensors"
)]
pub struct PredictArgs {
    /// The checkpoint (`ddm import`, or a trained expert).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Input tensors: `x_t` [N, ...], `t` [N] and optionally `y` [N] (int).
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
        let c = match input.contains("c") {
            true => Some(condition_vectors(&input, &args.input, &net, n)?.to_tensor::<2>(&device)),
            false => None,
        };
        let logits = HostTensor::from_tensor(net.logits(x_t, t, y, c));
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
    let model = ckpt.model(&args.checkpoint, &device)?;
    let v = match meta.objective {
        Objective::Velocity => model.velocity(x_t, t, &Condition::maybe_class(y))?,
        Objective::Epsilon { schedule } => EpsilonToVelocity::new(&model, schedule, meta.data.range)
            .velocity(x_t, t, &Condition::maybe_class(y))?,
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

/// The conditioning vectors `c` `[n, Dc]` of the input file, as the router reads them.
fn condition_vectors(
    input: &TensorFile,
    file: &std::path::Path,
    net: &ddm_router::net::RouterNet,
    n: usize,
) -> anyhow::Result<HostTensor> {
    let c = input.f32("c")?;
    let want = net.condition_dim();
    if want.is_none() || c.shape != [n, want.unwrap_or(0)] {
        bail!(
            "{}: `c` has shape {:?}, but the router reads {}",
            file.display(),
            c.shape,
            want.map_or("no conditioning vectors".to_string(), |d| format!("[{n}, {d}]"))
        );
    }
    Ok(c)
}
