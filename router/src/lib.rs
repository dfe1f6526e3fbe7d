//! ddm-router: the router predicts the cluster posterior p(k | x_t, t), which is exactly how the
//! ensemble weights its experts (docs/ARCHITECTURE.md). Learned ([`net`]: the DiT trunk or an MLP
//! with a K-way head; trained by `ddm_trainer::router`) or analytic ([`analytic`]: from
//! per-cluster statistics, no training). Inference only: this crate is what the sampler needs; it
//! depends on neither the trainer nor the data stack (`ddm_trainer::router_eval` measures a router
//! on data).

pub mod analytic;
pub mod net;

/// The router checkpoint at `path`, checked against a partition: same fingerprint, same K.
pub fn load_checked(
    path: &std::path::Path,
    manifest: &ddm_core::partition::PartitionManifest,
    device: &ddm_core::burn::prelude::Device,
) -> anyhow::Result<(ddm_core::checkpoint::CheckpointMeta, net::RouterNet)> {
    use anyhow::bail;
    let ckpt = ddm_core::checkpoint::Checkpoint::read(path)?;
    let m = &ckpt.meta;
    if m.role != ddm_core::checkpoint::Role::Router {
        bail!(
            "{}: a checkpoint of role {}, not a router",
            path.display(),
            m.role
        );
    }
    let k = m.num_clusters.unwrap_or(0);
    if k != manifest.k {
        bail!(
            "{}: a router for K = {k} clusters, but the partition has K = {}",
            path.display(),
            manifest.k
        );
    }
    if m.partition.as_deref() != Some(manifest.fingerprint.as_str()) {
        bail!(
            "{}: trained on partition {}, not this partition ({}): its cluster ids mean other clusters",
            path.display(),
            m.partition.as_deref().unwrap_or("(none)"),
            manifest.fingerprint
        );
    }
    let meta = ckpt.meta.clone();
    let net = net::RouterNet::from_checkpoint(path, ckpt, device)?;
    Ok((meta, net))
}
