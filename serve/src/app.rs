//! What the handlers share: the served models (one coalescing worker each), their metadata, the
//! token and the limits, built from a registry with every checkpoint verified as it loads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::condition::Condition;
use ddm_core::flow::{VelocityError, VelocityField};
use ddm_core::host::HostTensor;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::registry::claims::Claim;
use ddm_ensemble::remote::{Request, ServedCheckpoint, ServedMetadata};
use ddm_router::net::RouterNet;

use crate::ServeOptions;
use crate::batcher::{Batcher, Forward, MemoryBudget};
use crate::metrics::Metrics;

/// What the handlers share.
pub(crate) struct App {
    pub metadata: ServedMetadata,
    pub experts: BTreeMap<usize, Batcher>,
    pub router: Option<Batcher>,
    pub token: Option<String>,
    pub max_rows: usize,
    pub max_body_bytes: usize,
    pub timeout: Duration,
    pub body_timeout: Duration,
    pub metrics: Metrics,
}

/// A request's rows on `device`: `x_t` flattened to `[N, X]`, `t` `[N]`, and its condition
/// (class ids `y` `[N]`, vectors `c` `[N, Dc]`, token sequences `[N, L, Dt]` and `[N, L]`).
fn tensors(r: &Request, device: &Device) -> (Tensor<2>, Tensor<1>, Condition) {
    let n = r.rows();
    let x = HostTensor::new(vec![n, r.x_t.data.len() / n], r.x_t.data.clone()).to_tensor::<2>(device);
    let t = HostTensor::new(vec![n], r.t.clone()).to_tensor::<1>(device);
    let c = Condition {
        class: r
            .y
            .as_ref()
            .map(|y| Tensor::<1, Int>::from_data(TensorData::new(y.clone(), [n]), device)),
        vector: r.c.as_ref().map(|c| c.to_tensor::<2>(device)),
        tokens: r.tokens.as_ref().map(|(e, m)| ddm_core::condition::Tokens {
            embeddings: e.to_tensor::<3>(device),
            mask: m.to_tensor::<2>(device),
        }),
    };
    (x, t, c)
}

struct ExpertModel(Box<dyn VelocityField<2>>, Device);

impl Forward for ExpertModel {
    fn forward(&self, r: &Request) -> Result<HostTensor, VelocityError> {
        let (x, t, c) = tensors(r, &self.1);
        let v = HostTensor::from_tensor(self.0.velocity(x, t, &c)?);
        let count = v.data.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            return Err(VelocityError::NonFinite { count });
        }
        Ok(HostTensor::new(r.x_t.shape.clone(), v.data))
    }
}

struct RouterModel(RouterNet, Device);

impl Forward for RouterModel {
    fn forward(&self, r: &Request) -> Result<HostTensor, VelocityError> {
        let (x, t, c) = tensors(r, &self.1);
        Ok(HostTensor::from_tensor(self.0.logits(x, t, &c)))
    }
}

/// Whether `addr` is reachable only from this machine.
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Build the served models and the metadata (every checkpoint verified as it loads).
pub(crate) fn build(o: &ServeOptions, metrics: &Metrics) -> anyhow::Result<App> {
    if o.token.is_none() && !is_loopback(&o.listen) && !o.allow_unauthenticated {
        bail!(
            "{}: not a loopback address, and no token: set DDM_SERVE_TOKEN or --token-file (or pass --allow-unauthenticated to serve anyone who can connect)",
            o.listen
        );
    }
    let reg = Registry::open(&o.registry)?;
    let experts = experts_to_serve(o, &reg)?;
    let serve_router = o.router || (o.experts.is_none() && reg.index.router.is_some());
    if experts.is_empty() && !serve_router {
        bail!(
            "{}: nothing to serve (no local experts, no router)",
            o.registry.display()
        );
    }
    let served = |claim: Claim, e: &ddm_ensemble::registry::Entry| -> anyhow::Result<ServedCheckpoint> {
        let (_, ckpt) = reg.verified_checkpoint(claim)?;
        Ok(ServedCheckpoint {
            sha256: e.sha256.clone(),
            bytes: e.bytes,
            meta: ckpt.meta,
        })
    };
    let mut metadata = ServedMetadata {
        ddm_version: env!("CARGO_PKG_VERSION").into(),
        partition: reg.index.partition.clone(),
        k: reg.index.k,
        data: reg.index.data.clone(),
        experts: BTreeMap::new(),
        router: None,
        max_rows: o.max_rows,
    };
    let shared = o.max_memory.map(|cap| MemoryBudget::new(cap, metrics.clone()));
    let mut batchers = BTreeMap::new();
    for &k in &experts {
        let entry = &reg.index.experts[&k];
        metadata.experts.insert(k, served(Claim::Expert(k), entry)?);
        let (dir, device, precision) = (o.registry.clone(), o.device.clone(), o.precision);
        let load = move || -> anyhow::Result<ExpertModel> {
            let mut reg = Registry::open(&dir)?;
            reg.precision = precision;
            Ok(ExpertModel(reg.expert(k, &device)?, device.clone()))
        };
        let what = format!("expert {k}");
        let budget = budget(shared.as_ref(), &what, entry.bytes)?;
        batchers.insert(k, Batcher::start(what, load, o.batch, metrics.clone(), budget)?);
        tracing::info!("serving expert {k}");
    }
    let router = match serve_router {
        true => {
            let e = reg
                .index
                .router
                .as_ref()
                .with_context(|| format!("{}: no router registered", o.registry.display()))?;
            metadata.router = Some(served(Claim::Router, e)?);
            let (dir, device) = (o.registry.clone(), o.device.clone());
            let load = move || -> anyhow::Result<RouterModel> {
                let reg = Registry::open(&dir)?;
                Ok(RouterModel(reg.router(&device)?, device.clone()))
            };
            tracing::info!("serving the router");
            let budget = budget(shared.as_ref(), "the router", e.bytes)?;
            Some(Batcher::start(
                "router".into(),
                load,
                o.batch,
                metrics.clone(),
                budget,
            )?)
        }
        false => None,
    };
    Ok(App {
        metadata,
        experts: batchers,
        router,
        token: o.token.clone(),
        max_rows: o.max_rows,
        max_body_bytes: o.max_body_bytes,
        timeout: o.request_timeout,
        body_timeout: o.limits.body_timeout,
        metrics: metrics.clone(),
    })
}

/// The experts to serve: those asked for (each registered here, as a file), else every local
/// one (none when only the router is asked for).
fn experts_to_serve(o: &ServeOptions, reg: &Registry) -> anyhow::Result<Vec<usize>> {
    let Some(list) = &o.experts else {
        return Ok(match o.router {
            true => vec![],
            false => reg
                .index
                .experts
                .iter()
                .filter(|(_, e)| e.remote.is_none())
                .map(|(&k, _)| k)
                .collect(),
        });
    };
    for k in list {
        match reg.index.experts.get(k) {
            None => bail!("{}: no expert registered for cluster {k}", o.registry.display()),
            Some(e) if e.remote.is_some() => bail!(
                "{}: expert {k} is itself served elsewhere ({})",
                o.registry.display(),
                e.source
            ),
            Some(_) => {}
        }
    }
    Ok(list.clone())
}

/// A model's share of the shared memory budget (`--max-memory`), refused when it alone is over.
fn budget(
    shared: Option<&Arc<MemoryBudget>>,
    what: &str,
    bytes: u64,
) -> anyhow::Result<Option<(Arc<MemoryBudget>, u64)>> {
    match shared {
        Some(b) if bytes > b.cap() => bail!(
            "{what} takes {:.1} MiB, more than --max-memory {:.1} MiB",
            bytes as f64 / (1 << 20) as f64,
            b.cap() as f64 / (1 << 20) as f64
        ),
        Some(b) => Ok(Some((b.clone(), bytes))),
        None => Ok(None),
    }
}
