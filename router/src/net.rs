//! The router network: the DiT trunk of `ddm-core` (reused, not copied) with mean pooling over
//! tokens, a LayerNorm and a linear head to K logits; or, for vector data, the MLP with K outputs.
//! Both take x_t and t, and a conditioned router also the class c (DiT's class embedding, with a
//! null class so one router serves conditional and unconditional sampling): p(k | x_t, t, c).
//! Both start at uniform logits (zero-initialised head).
//!
//! Parameter names: the trunk keeps the PyTorch DiT names; the head is `head.weight`/`head.bias`.

use std::collections::BTreeMap;

use ddm_core::burn;
use ddm_core::burn::nn::Linear;
use ddm_core::burn::prelude::*;
use ddm_core::dit::{DiT, layer_norm};
use ddm_core::host::HostTensor;
use ddm_core::mlp::Mlp;
use ddm_core::model::ModelConfig;
use ddm_core::params::{Init, ParamSource, StateDict};

/// DiT trunk + mean pool + LayerNorm + linear head.
#[derive(Module, Debug)]
pub struct DitRouter {
    trunk: DiT,
    head: Linear,
}

/// A router network.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum RouterNet {
    Dit(DitRouter),
    Mlp(Mlp),
}

/// The trunk config of a router with `k` outputs (an MLP's `out_dim` is K).
pub fn router_config(trunk: ModelConfig, k: usize) -> ModelConfig {
    match trunk {
        ModelConfig::Mlp(mut m) => {
            m.out_dim = Some(k);
            ModelConfig::Mlp(m)
        }
        dit => dit,
    }
}

impl RouterNet {
    /// Build from `config` (a DiT trunk config, or an MLP with `out_dim` = K) for `k` clusters.
    pub fn build(config: &ModelConfig, k: usize, src: &mut impl ParamSource) -> ddm_core::Result<Self> {
        Ok(match config {
            ModelConfig::Dit(c) => {
                let trunk = c.build_trunk(src)?;
                // Zero-initialised head: a fresh router predicts the uniform distribution.
                let head = src.linear("head", c.hidden_size, k, Init::Zeros)?;
                RouterNet::Dit(DitRouter { trunk, head })
            }
            ModelConfig::Mlp(m) => {
                if m.out_dim != Some(k) {
                    return Err(ddm_core::Error::InvalidConfig(format!(
                        "an MLP router for K = {k} needs out_dim {k}, got {:?}",
                        m.out_dim
                    )));
                }
                RouterNet::Mlp(m.build(src)?)
            }
        })
    }

    /// The router stored in `ckpt` (read from `path`, named in errors), every tensor checked.
    pub fn from_checkpoint(
        path: &std::path::Path,
        ckpt: ddm_core::checkpoint::Checkpoint,
        device: &Device,
    ) -> ddm_core::Result<Self> {
        let k = ckpt.meta.num_clusters.unwrap_or(0);
        let mut src = ddm_core::params::StateLoader::new(path, ckpt.tensors, device);
        let net = RouterNet::build(&ckpt.meta.model, k, &mut src)?;
        src.finish("router")?;
        Ok(net)
    }

    /// The network's configuration.
    pub fn config(&self) -> ModelConfig {
        match self {
            RouterNet::Dit(r) => ModelConfig::Dit(r.trunk.config().clone()),
            RouterNet::Mlp(m) => ModelConfig::Mlp(m.config().clone()),
        }
    }

    /// Classes the router is conditioned on (0: it sees only x_t and t).
    pub fn classes(&self) -> usize {
        self.config().num_classes()
    }

    /// Whether the router can route without a class (a conditioned router trained with condition
    /// dropout has a null class; an unconditioned one never needs a class).
    pub fn routes_without_class(&self) -> bool {
        let c = self.config();
        c.num_classes() == 0 || c.has_null_class()
    }

    /// The class input the network reads: `y` for a conditioned router (the null class when
    /// `y` is None), nothing for an unconditioned one (which ignores any `y`).
    fn condition(&self, y: Option<Tensor<1, Int>>, n: usize, device: &Device) -> Option<Tensor<1, Int>> {
        match self.classes() {
            0 => None,
            classes => Some(y.unwrap_or_else(|| Tensor::full([n], classes as i64, device))),
        }
    }

    /// Cluster logits: of p(k | x_t, t, c) for a conditioned router, p(k | x_t, t) otherwise.
    ///
    /// # Shapes
    /// - `x_t`: `[N, X]` (flattened samples), `t`: `[N]`, `y`: `[N]` class ids -> `[N, K]`
    pub fn logits(&self, x_t: Tensor<2>, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<2> {
        match self {
            RouterNet::Dit(r) => r.head.forward(self.features(x_t, t, y)), // [N, K]
            RouterNet::Mlp(m) => {
                let y = self.condition(y, x_t.dims()[0], &x_t.device());
                m.forward(x_t, t, y)
            }
        }
    }

    /// What the head reads: the pooled, normalised tokens (DiT), or the MLP's last hidden layer.
    /// An image classifier built like a router uses these as its feature space.
    ///
    /// # Shapes
    /// - `x_t`: `[N, X]`, `t`: `[N]`, `y`: `[N]` -> `[N, D]`
    pub fn features(&self, x_t: Tensor<2>, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<2> {
        let [n, _] = x_t.dims();
        let y = self.condition(y, n, &x_t.device());
        match self {
            RouterNet::Dit(r) => {
                let c = r.trunk.config();
                let x = x_t.reshape([n, c.in_channels, c.input_size, c.input_size]);
                let (tokens, _) = r.trunk.trunk(x, t, y); // [N, T, D]
                layer_norm(tokens.mean_dim(1).reshape([n, c.hidden_size])) // [N, D]
            }
            RouterNet::Mlp(m) => m.features(x_t, t, y),
        }
    }

    pub fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        match self {
            RouterNet::Dit(r) => {
                let mut sd = r.trunk.state_dict();
                let mut head = StateDict::default();
                head.linear("head", &r.head);
                sd.0.extend(head.0);
                sd.0
            }
            RouterNet::Mlp(m) => m.state_dict().0,
        }
    }
}
