//! The expert training loop, top to bottom: draw a batch, t and noise; x_t; flow-matching loss;
//! backward; AdamW (warm-up, gradient clipping); EMA; log; checkpoint. One island, one shard, no
//! network. The state saved at each checkpoint is the loop's whole state, so a restart of the same
//! command continues exactly where the last checkpoint left off (bit-identical on the CPU backend).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use ddm_core::burn::grad_clipping::GradientClippingConfig;
use ddm_core::burn::module::{Module, ModuleVisitor, Param};
use ddm_core::burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Objective, TrainingSummary};
use ddm_core::device::DeviceChoice;
use ddm_core::dit::DiTConfig;
use ddm_core::flow::{self, Solver, StepSchedule};
use ddm_core::host::HostTensor;
use ddm_core::mlp::MlpConfig;
use ddm_core::model::{Model, ModelConfig};
use ddm_datasets::Dataset;
use ddm_datasets::partition::PartitionManifest;
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::island::{self, Target};
use crate::metrics::{Line, Metrics};
use crate::state::{self, LoopState};

/// Everything one run needs, validated.
pub struct Run {
    pub partition_dir: PathBuf,
    pub manifest: PartitionManifest,
    pub target: Target,
    pub out: PathBuf,
    pub config: TrainConfig,
    pub device: DeviceChoice,
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; the expert checkpoint is written.
    Finished {
        checkpoint: PathBuf,
        final_loss: Option<f64>,
    },
    /// SIGINT/SIGTERM: state saved at `step`; rerun the same command to resume.
    Interrupted { step: u64 },
}

pub const EXPERT_FILE: &str = "expert.safetensors";

fn target_name(t: Target) -> String {
    match t {
        Target::Cluster(k) => format!("cluster:{k}"),
        Target::Monolith => "monolith".into(),
    }
}

/// The expert's network for this data.
pub fn model_config(config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
    let s = &data.shape;
    if config.model.eq_ignore_ascii_case("mlp") {
        let mut m = MlpConfig::new(data.sample_size());
        (m.hidden_size, m.depth) = (config.mlp_hidden, config.mlp_depth);
        return Ok(ModelConfig::Mlp(m));
    }
    if s.len() != 3 || s[1] != s[2] {
        bail!(
            "a DiT needs square images [C, S, S]; {} has samples of shape {s:?} (use --model mlp for vectors)",
            data.name
        );
    }
    let mut dit = DiTConfig::named(&config.model, s[1], s[0])?;
    if config.class_conditional {
        dit.num_classes = data
            .num_classes
            .context("--class-conditional needs labelled data; this data has no labels")?;
        dit.class_dropout_prob = config.class_dropout;
    } else {
        dit.class_dropout_prob = 0.0;
    }
    Ok(ModelConfig::Dit(dit))
}

fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    let mut adamw = AdamWConfig::new().with_weight_decay(config.weight_decay as f32);
    if config.grad_clip > 0.0 {
        adamw = adamw.with_grad_clipping(Some(GradientClippingConfig::Norm(config.grad_clip as f32)));
    }
    adamw.init()
}

/// Global L2 norm of the gradients (for the metrics; clipping itself happens in the optimizer).
struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum.push((g.clone() * g).sum());
        }
    }
}

/// Run (or resume) training.
pub fn run(run: Run) -> anyhow::Result<Outcome> {
    let Run {
        partition_dir,
        manifest,
        target,
        out,
        config,
        device,
        progress,
    } = run;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("bad training config: {e}"))?;

    // Fail before any work if the output directory is not writable.
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let saved = state::read_loop_state(&out)?;
    if let Some(s) = &saved
        && (!s.config.same_run(&config)
            || s.target != target_name(target)
            || s.partition != manifest.fingerprint)
    {
        bail!(
            "{} holds a different run ({}, partition {}, config {:?}); use a new --out or the same flags to resume",
            out.display(),
            s.target,
            &s.partition[..12.min(s.partition.len())],
            s.config
        );
    }
    let resolved = toml::to_string_pretty(&config)?;
    ddm_core::fsio::write_bytes_atomic(&out.join("config.toml"), resolved.as_bytes())
        .with_context(|| format!("the output directory {} is not writable", out.display()))?;

    let data = island::load(&partition_dir, &manifest, target)?;
    let n = data.len();
    let model_config = model_config(&config, &data)?;
    let plain = ddm_core::device::device(device)?;
    let train_device = plain.clone().autodiff();

    // Fresh state, or the saved one.
    let (mut st, mut model, mut ema, mut optim) = match saved {
        Some(_) => {
            let l = state::load(&out, &plain, &train_device, optimizer(&config))?;
            let mut st = l.state;
            st.config = config.clone(); // steps, lr and cadences may change on resume
            eprintln!("resuming {} at step {}", out.display(), st.step);
            (st, l.model, l.ema, l.optim)
        }
        None => {
            let model = model_config.init(config.seed, &train_device)?;
            let ema = model.valid();
            let st = LoopState {
                format_version: 1,
                config: config.clone(),
                model: model_config.clone(),
                target: target_name(target),
                partition: manifest.fingerprint.clone(),
                step: 0,
                epoch: 0,
                pos: 0,
                rng_word_pos: "0".into(),
                samples_seen: 0,
                wall_time_s: 0.0,
                last_loss: None,
            };
            (st, model, ema, optimizer(&config))
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_word_pos(
        st.rng_word_pos
            .parse()
            .context("bad RNG position in the training state")?,
    );
    let order = |epoch: u64| {
        let mut p: Vec<usize> = (0..n).collect();
        p.shuffle(&mut ChaCha8Rng::seed_from_u64(
            config.seed ^ 0x0da7_a0de_u64.wrapping_mul(epoch + 1),
        ));
        p
    };
    let mut perm = order(st.epoch);
    let mut metrics = Metrics::open(&out, st.step)?;
    let per_sample = data.sample_size();
    let classes = match &model_config {
        ModelConfig::Dit(c) if c.num_classes > 0 => Some(c.num_classes),
        _ => None,
    };

    // SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }

    let bar = indicatif::ProgressBar::new(config.steps);
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {}", target_name(target), config.model));
    bar.set_position(st.step);
    let started = Instant::now();
    let wall_before = st.wall_time_s;
    let mut window = (Instant::now(), 0u64);
    let mut last_good_ckpt = st.step;

    while st.step < config.steps {
        // 1. The batch: the next samples of this epoch's permutation.
        let b = config.batch_size;
        let mut idx = Vec::with_capacity(b);
        while idx.len() < b {
            if st.pos == n {
                st.epoch += 1;
                st.pos = 0;
                perm = order(st.epoch);
            }
            let take = (b - idx.len()).min(n - st.pos);
            idx.extend_from_slice(&perm[st.pos..st.pos + take]);
            st.pos += take;
        }
        let x0 = HostTensor::new(vec![b, per_sample], data.gather(&idx)).to_tensor::<2>(&train_device);
        // 2. Noise, times and (dropped-out) labels from the run's RNG.
        let e = flow::randn(vec![b, per_sample], &mut rng).to_tensor::<2>(&train_device);
        let t = Tensor::<1>::from_data(
            TensorData::new(config.time_sampler.sample(b, &mut rng), [b]),
            &train_device,
        );
        let y = classes.map(|k| {
            let labels = data
                .gather_labels(&idx)
                .expect("class-conditional data has labels");
            let y: Vec<i64> = labels
                .iter()
                .map(|&l| {
                    if rng.random::<f64>() < config.class_dropout {
                        k as i64
                    } else {
                        l as i64
                    }
                })
                .collect();
            Tensor::<1, Int>::from_data(TensorData::new(y, [b]), &train_device)
        });
        // 3. Flow matching: x_t, predicted velocity, loss against e - x0.
        let x_t = flow::interpolate(x0.clone(), e.clone(), t.clone());
        let v = model.predict(x_t, t, y);
        let loss = flow::flow_matching_loss(v, x0, e);
        let loss_value = loss.clone().into_scalar::<f32>() as f64; // device sync point
        if !loss_value.is_finite() {
            bar.abandon();
            bail!(
                "the loss became {loss_value} at step {} (lr {:.3e}); training stopped. The last good checkpoint \
                 (step {last_good_ckpt}) is intact in {}: rerun with a lower --lr to resume from it",
                st.step + 1,
                config.lr_at(st.step),
                state::path(&out).display()
            );
        }
        // 4. Backward, optimizer step (AdamW with warm-up and clipping), EMA.
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let log_now = (st.step + 1) % config.log_every == 0;
        let grad_norm = if log_now {
            let mut g = GradNorm {
                grads: &grads,
                sum: vec![],
            };
            model.visit(&mut g);
            Tensor::cat(g.sum, 0).sum().into_scalar::<f32>().sqrt() as f64
        } else {
            0.0
        };
        let lr = config.lr_at(st.step);
        model = optim.step(lr, model, grads);
        ema = crate::ema::update(ema, &model.valid(), config.ema_decay);
        st.step += 1;
        st.samples_seen += b as u64;
        st.last_loss = Some(loss_value);
        st.rng_word_pos = rng.get_word_pos().to_string();
        bar.set_position(st.step);
        // 5. Log.
        window.1 += b as u64;
        if log_now {
            let secs = window.0.elapsed().as_secs_f64();
            let ips = window.1 as f64 / secs.max(1e-9);
            window = (Instant::now(), 0);
            bar.set_message(format!("loss {loss_value:.4} {ips:.1} img/s"));
            metrics.write(&Line {
                step: st.step,
                loss: loss_value,
                lr,
                grad_norm,
                img_per_s: ips,
                samples_seen: st.samples_seen,
                wall_time_s: wall_before + started.elapsed().as_secs_f64(),
            })?;
        }
        // 6. Checkpoint (and samples).
        st.wall_time_s = wall_before + started.elapsed().as_secs_f64();
        let interrupted = stop.load(Ordering::Relaxed);
        if st.step % config.checkpoint_every == 0 || st.step == config.steps || interrupted {
            state::save(&out, &st, &model, &ema, &optim)?;
            last_good_ckpt = st.step;
            let title = format!(
                "{} {} ({})",
                target_name(target),
                config.model,
                manifest.dataset.name
            );
            crate::plot::loss_curve(&out.join("loss.png"), &title, &Metrics::losses(&out))?;
        }
        if config.sample_every > 0 && st.step % config.sample_every == 0 {
            write_samples(
                &ema,
                &model_config,
                &out.join(format!("samples-{:07}.png", st.step)),
                config.seed,
            )?;
        }
        if interrupted {
            bar.abandon_with_message(format!("interrupted; state saved at step {}", st.step));
            return Ok(Outcome::Interrupted { step: st.step });
        }
    }
    bar.finish();

    // The expert: EMA weights with the contract metadata.
    let mut meta = CheckpointMeta::expert(model_config.clone(), data.range(), Objective::Velocity);
    meta.partition = Some(manifest.fingerprint.clone());
    meta.cluster = match target {
        Target::Cluster(k) => Some(k),
        Target::Monolith => None,
    };
    meta.source = Some(format!(
        "ddm-trainer {} on {}",
        target_name(target),
        manifest.dataset.name
    ));
    meta.training = Some(TrainingSummary {
        steps: st.step,
        samples_seen: st.samples_seen,
        // forward + backward ~ 3x the forward pass
        flops: 3.0 * model_config.flops_per_sample() * st.samples_seen as f64,
        seed: config.seed,
        wall_time_s: st.wall_time_s,
        final_loss: st.last_loss,
        backend: device.to_string(),
        ema: Some(config.ema_decay),
    });
    let ckpt_path = out.join(EXPERT_FILE);
    Checkpoint {
        meta,
        tensors: state::host_weights(&ema),
    }
    .save(&ckpt_path)?;
    write_samples(&ema, &model_config, &out.join("samples.png"), config.seed)?;
    Ok(Outcome::Finished {
        checkpoint: ckpt_path,
        final_loss: st.last_loss,
    })
}

/// A grid of 16 EMA samples (Euler, 32 steps), for images.
pub fn write_samples(ema: &Model, config: &ModelConfig, path: &Path, seed: u64) -> anyhow::Result<()> {
    let shape = config.data_shape();
    if shape.len() != 3 || !(shape[0] == 1 || shape[0] == 3) {
        return Ok(());
    }
    let device = ema
        .devices()
        .first()
        .cloned()
        .unwrap_or_else(ddm_core::device::cpu);
    let n = 16;
    let per: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5a5a);
    let x1 = flow::randn(vec![n, per], &mut rng).to_tensor::<2>(&device);
    let y = match config {
        ModelConfig::Dit(c) if c.num_classes > 0 => Some(Tensor::<1, Int>::from_data(
            TensorData::new(
                (0..n as i64)
                    .map(|i| i % c.num_classes as i64)
                    .collect::<Vec<_>>(),
                [n],
            ),
            &device,
        )),
        _ => None,
    };
    let x0 = flow::integrate(ema, x1, y, &StepSchedule::Uniform.times(32), Solver::Euler);
    let px = ddm_datasets::grid::to_u8(&HostTensor::from_tensor(x0).data);
    let cells: Vec<Option<&[u8]>> = px.chunks(per).map(Some).collect();
    ddm_datasets::grid::write_grid_png(path, &cells, [shape[0], shape[1], shape[2]], 8, 2, 40)?;
    Ok(())
}
