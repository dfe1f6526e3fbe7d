//! Scoring side of the experiment: every system samples from the same noise and is judged
//! (image metrics or exact mixture metrics); rows go to results.jsonl.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::Checkpoint;
use ddm_core::condition::Condition;
use ddm_core::flow::{self, Drift, VelocityField};
use ddm_core::host::HostTensor;
use ddm_ensemble::experts::Guidance;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::sample::Classes;
use ddm_ensemble::sampler::{Ensemble, ExpertSlot, LearnedRouter, Posterior};
use rand::SeedableRng;

use super::text::Adherence;
use super::{Judge, Row, Setting, System};
use crate::images::ImageReport;
use crate::mixture::MixtureReport;

/// Integrate N samples from the seeded noise with `field` (class-balanced in a conditional
/// setting: the class, or the prompts' vectors); returns them and the seconds taken.
fn integrate(
    field: &mut dyn Drift<2>,
    setting: &Setting,
    shape: &[usize],
    device: &Device,
) -> anyhow::Result<(Vec<f32>, f64)> {
    let per: usize = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(setting.seed);
    let x1 = flow::randn(vec![setting.n, per], &mut rng).to_tensor::<2>(device);
    let condition = match (&setting.conditional, setting.prompts()) {
        (_, Some(p)) => Condition::vector(p.vectors.to_tensor::<2>(device)),
        (Some(c), None) => {
            let ids = Classes::All.ids(setting.n, c.classes);
            Condition::class(Tensor::<1, Int>::from_data(
                TensorData::new(ids, [setting.n]),
                device,
            ))
        }
        (None, None) => Condition::none(),
    };
    let times = setting.schedule.times(setting.sample_steps);
    let t0 = Instant::now();
    let x0 = HostTensor::from_tensor(flow::integrate(field, x1, &condition, &times, setting.solver)?);
    Ok((x0.data, t0.elapsed().as_secs_f64()))
}

fn write_grid(path: &Path, x: &[f32], shape: &[usize]) -> anyhow::Result<()> {
    if shape.len() != 3 || !(shape[0] == 1 || shape[0] == 3) {
        return Ok(());
    }
    let per: usize = shape.iter().product();
    let shown = &x[..(100 * per).min(x.len())];
    let px = ddm_core::grid::to_u8(shown);
    let cells: Vec<Option<&[u8]>> = px.chunks(per).map(Some).collect();
    std::fs::create_dir_all(path.parent().unwrap())?;
    ddm_core::grid::write_grid_png(path, &cells, [shape[0], shape[1], shape[2]], 10, 2, 40)?;
    Ok(())
}

/// The scores of samples `x` `[N, ...shape]`: image metrics (with prompt adherence in the text
/// setting) or the mixture's exact metrics.
fn judge(
    j: &Judge,
    setting: &Setting,
    field: &mut dyn Drift<2>,
    x: &[f32],
    shape: &[usize],
    device: &Device,
) -> anyhow::Result<Scores> {
    let seed = setting.seed;
    Ok(match j {
        Judge::Images(e) => Scores {
            images: Some(e.evaluate(x, seed)?),
            mixture: None,
            adherence: match setting.prompts() {
                Some(p) => Some(super::text::adherence(p, x, shape, &e.net)?),
                None => None,
            },
        },
        Judge::Mixture(g) => Scores {
            images: None,
            mixture: Some(crate::mixture::evaluate(field, x, g, seed, device)?),
            adherence: None,
        },
    })
}

/// What [`judge`] gives a row.
struct Scores {
    images: Option<ImageReport>,
    mixture: Option<MixtureReport>,
    adherence: Option<Adherence>,
}

/// Classifier-free guidance evaluates every model row twice (with the class and the null class).
fn cfg_factor(sys: &System) -> f64 {
    if sys.guidance == 1.0 { 1.0 } else { 2.0 }
}

/// Sample and score one system at one stage.
pub(super) fn evaluate_system(
    setting: &Setting,
    dir: &Path,
    pct: u32,
    sys: &System,
    judge_with: &Judge,
) -> anyhow::Result<Row> {
    let device = ddm_core::device::device(setting.device)?;
    let samples_png = dir.join(format!("samples/{pct}/{}.png", sys.name.replace(' ', "_")));
    let Some(which) = sys.partition else {
        let path = dir.join(format!("registry/monolith-{pct}.safetensors"));
        let (meta, net) = ddm_core::checkpoint::load(&path, &device)?;
        let model: Box<dyn VelocityField<2>> = match &setting.conditional {
            Some(c) => Box::new(ddm_core::flow::ClassifierFreeGuidance {
                inner: net,
                null_class: c.text.is_none().then_some(c.classes),
                scale: sys.guidance,
            }),
            None => Box::new(net),
        };
        let (x, secs) = integrate(&mut model.as_ref(), setting, &meta.data.shape, &device)?;
        write_grid(&samples_png, &x, &meta.data.shape)?;
        let scores = judge(
            judge_with,
            setting,
            &mut model.as_ref(),
            &x,
            &meta.data.shape,
            &device,
        )?;
        return Ok(Row {
            setting: setting.name.clone(),
            stage_pct: pct,
            system: sys.name.clone(),
            train_flops: meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0),
            sample_gflops: (setting.sample_steps * setting.solver.evaluations_per_step()) as f64
                * meta.model.flops_per_sample()
                * cfg_factor(sys)
                / 1e9,
            sample_seconds: secs / setting.n as f64,
            images: scores.images,
            mixture: scores.mixture,
            adherence: scores.adherence,
        });
    };
    let reg = Registry::open(&dir.join(format!("registry/{which}-{pct}")))?;
    let k = reg.index.k;
    let strategy = sys.strategy.expect("an ensemble has a strategy");
    let guidance = match &setting.conditional {
        Some(c) => Guidance {
            max_class: c.text.is_none().then(|| c.classes - 1),
            vectors: c.text.is_some(),
            scale: sys.guidance,
        },
        None => Guidance::default(),
    };
    let experts: Vec<ExpertSlot> = (0..k)
        .map(|c| {
            let (reg, device) = (&reg, device.clone());
            ExpertSlot::lazy(move || reg.expert_guided(c, &device, guidance))
        })
        .collect();
    let router_entry = reg
        .index
        .router
        .as_ref()
        .context("the stage registry has no router")?;
    let router_ckpt = Checkpoint::read(&router_entry.blob(&reg.dir))?;
    let router_flops = router_ckpt.meta.model.flops_per_sample();
    let mut train_flops = router_ckpt.meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0);
    let mut expert_flops = 0.0;
    for e in reg.index.experts.values() {
        let c = Checkpoint::read(&e.blob(&reg.dir))?;
        train_flops += c.meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0);
        expert_flops = c.meta.model.flops_per_sample();
    }
    let router: Option<Box<dyn Posterior>> = if sys.analytic {
        Some(Box::new(reg.analytic_router()?))
    } else {
        Some(Box::new(LearnedRouter {
            net: reg.router(&device)?,
            k,
        }))
    };
    let mut ensemble = Ensemble::new(experts, router, strategy, setting.seed)?;
    let shape = reg.index.data.shape.clone();
    let (x, secs) = integrate(&mut ensemble, setting, &shape, &device)?;
    let (rows, router_rows) = ensemble.usage.iter().fold((0, 0), |(r, q), u| {
        (r + u.rows_per_expert.iter().sum::<usize>(), q + u.router_rows)
    });
    // The analytic router's cost is a few dot products per cluster: not counted.
    let router_cost = if sys.analytic {
        0.0
    } else {
        router_rows as f64 / setting.n as f64 * router_flops
    };
    let sample_gflops = (rows as f64 / setting.n as f64 * expert_flops * cfg_factor(sys) + router_cost) / 1e9;
    write_grid(&samples_png, &x, &shape)?;
    let scores = judge(judge_with, setting, &mut ensemble, &x, &shape, &device)?;
    Ok(Row {
        setting: setting.name.clone(),
        stage_pct: pct,
        system: sys.name.clone(),
        train_flops,
        sample_gflops,
        sample_seconds: secs / setting.n as f64,
        images: scores.images,
        mixture: scores.mixture,
        adherence: scores.adherence,
    })
}

/// The rows of a results.jsonl. Every row must carry exactly one kind of score (images or
/// mixture), all rows the same kind: a file that mixes them is refused, naming the line.
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows: Vec<Row> = vec![];
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: Row = serde_json::from_str(l)
            .with_context(|| format!("{} line {}: not a result row", path.display(), i + 1))?;
        let kind = match (&row.images, &row.mixture) {
            (Some(_), None) => "image",
            (None, Some(_)) => "mixture",
            _ => bail!(
                "{} line {}: a row needs exactly one of `images` and `mixture`",
                path.display(),
                i + 1
            ),
        };
        if let Some(first) = rows.first()
            && first.images.is_some() != row.images.is_some()
        {
            bail!(
                "{} line {}: a {kind} row in a file of {} rows; one results.jsonl holds one setting",
                path.display(),
                i + 1,
                if first.images.is_some() {
                    "image"
                } else {
                    "mixture"
                }
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

pub(super) fn append_row(path: &Path, row: &Row) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(row)?)?;
    f.sync_all()?;
    Ok(())
}
