//! The router network: the DiT trunk of `ddm-core` (reused, not copied) with mean pooling over
//! tokens, a LayerNorm and a linear head to K logits; or, for vector data, the MLP with K outputs.
//! Both take x_t and t, and a conditioned router also the condition: a class (DiT's class
//! embedding, with a null class so one router serves conditional and unconditional sampling),
//! a per-sample conditioning vector c (a linear projection `c_embedder` added to the
//! conditioning vector; the zero vector is its null, as condition dropout trains it), and/or a
//! token sequence (a caption's token states, averaged over its tokens, padding left out, then
//! projected by `c_tokens_embedder`; the all-padding sequence averages to the zero vector, its
//! null): p(k | x_t, t, c). All start at uniform logits (zero-initialised head).
//!
//! Parameter names: the trunk keeps the PyTorch DiT names; the head is `head.weight`/`head.bias`,
//! the projections `c_embedder.*` and `c_tokens_embedder.*`.

use std::collections::BTreeMap;

use ddm_core::burn;
use ddm_core::burn::nn::Linear;
use ddm_core::burn::prelude::*;
use ddm_core::condition::{Condition, Tokens};
use ddm_core::dit::{DiT, layer_norm};
use ddm_core::host::HostTensor;
use ddm_core::mlp::Mlp;
use ddm_core::model::ModelConfig;
use ddm_core::params::{Init, ParamSource};

/// DiT trunk + mean pool + LayerNorm + linear head.
#[derive(Module, Debug)]
pub struct DitRouter {
    trunk: DiT,
    head: Linear,
}

/// The network under the head: a DiT trunk or an MLP.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum RouterBody {
    Dit(DitRouter),
    Mlp(Mlp),
}

/// A router network.
#[derive(Module, Debug)]
pub struct RouterNet {
    body: RouterBody,
    /// Projection of the conditioning vector c `[Dc] -> [D]` (vector-conditioned routers).
    c_embedder: Option<Linear>,
    /// Projection of a token sequence's mean token `[Dt] -> [D]` (token-conditioned routers).
    c_tokens_embedder: Option<Linear>,
}

/// The per-sample conditioning a router reads besides the class: the widths of the vectors and
/// of the token states (None: it reads none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterInputs {
    pub vector: Option<usize>,
    pub tokens: Option<usize>,
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
    /// Build from `config` (a DiT trunk config, or an MLP with `out_dim` = K) for `k` clusters,
    /// conditioned on the vectors and token sequences of `inputs`.
    pub fn build(
        config: &ModelConfig,
        k: usize,
        inputs: RouterInputs,
        src: &mut impl ParamSource,
    ) -> ddm_core::Result<Self> {
        let (body, hidden) = match config {
            ModelConfig::Dit(c) => {
                let trunk = c.build_trunk(src)?;
                // Zero-initialised head: a fresh router predicts the uniform distribution.
                let head = src.linear("head", c.hidden_size, k, Init::Zeros)?;
                (RouterBody::Dit(DitRouter { trunk, head }), c.hidden_size)
            }
            ModelConfig::Mlp(m) => {
                if m.out_dim != Some(k) {
                    return Err(ddm_core::Error::InvalidConfig(format!(
                        "an MLP router for K = {k} needs out_dim {k}, got {:?}",
                        m.out_dim
                    )));
                }
                (RouterBody::Mlp(m.build(src)?), m.hidden_size)
            }
            ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => {
                return Err(ddm_core::Error::InvalidConfig(format!(
                    "a router is a DiT trunk or an MLP, not a model of arch \"{}\"",
                    config.arch()
                )));
            }
        };
        let mut projection = |name: &str, width: Option<usize>, what: &str| match width {
            Some(0) => Err(ddm_core::Error::InvalidConfig(format!(
                "{what} needs at least one value"
            ))),
            Some(d) => Ok(Some(src.linear(name, d, hidden, Init::Xavier)?)),
            None => Ok(None),
        };
        let c_embedder = projection("c_embedder", inputs.vector, "a conditioning vector")?;
        let c_tokens_embedder = projection("c_tokens_embedder", inputs.tokens, "a token state")?;
        Ok(Self {
            body,
            c_embedder,
            c_tokens_embedder,
        })
    }

    /// The router stored in `ckpt` (read from `path`, named in errors), every tensor checked.
    pub fn from_checkpoint(
        path: &std::path::Path,
        ckpt: ddm_core::checkpoint::Checkpoint,
        device: &Device,
    ) -> ddm_core::Result<Self> {
        let k = ckpt.meta.num_clusters.unwrap_or(0);
        let inputs = RouterInputs {
            vector: ckpt.meta.condition_dim,
            tokens: ckpt.meta.condition_token_dim,
        };
        let mut src = ddm_core::params::StateLoader::new(path, ckpt.tensors, device);
        let net = RouterNet::build(&ckpt.meta.model, k, inputs, &mut src)?;
        src.finish("router")?;
        Ok(net)
    }

    /// The network's configuration.
    pub fn config(&self) -> ModelConfig {
        match &self.body {
            RouterBody::Dit(r) => ModelConfig::Dit(r.trunk.config().clone()),
            RouterBody::Mlp(m) => ModelConfig::Mlp(m.config().clone()),
        }
    }

    /// Classes the router is conditioned on (0: it does not see a class).
    pub fn classes(&self) -> usize {
        self.config().num_classes()
    }

    /// The length of the conditioning vectors it reads (None: it reads none).
    pub fn condition_dim(&self) -> Option<usize> {
        self.c_embedder.as_ref().map(|l| l.weight.dims()[0])
    }

    /// The width of the token states it reads (None: it reads no token sequences).
    pub fn token_dim(&self) -> Option<usize> {
        self.c_tokens_embedder.as_ref().map(|l| l.weight.dims()[0])
    }

    /// The vectors and token sequences it reads.
    pub fn inputs(&self) -> RouterInputs {
        RouterInputs {
            vector: self.condition_dim(),
            tokens: self.token_dim(),
        }
    }

    /// Whether the router can route without a class (a conditioned router trained with condition
    /// dropout has a null class; an unconditioned one never needs a class).
    pub fn routes_without_class(&self) -> bool {
        let c = self.config();
        c.num_classes() == 0 || c.has_null_class()
    }

    /// The class input the network reads: `y` for a class-conditioned router (the null class
    /// when `y` is None), nothing for one without classes (which ignores any `y`).
    fn class_input(&self, y: Option<Tensor<1, Int>>, n: usize, device: &Device) -> Option<Tensor<1, Int>> {
        match self.classes() {
            0 => None,
            classes => Some(y.unwrap_or_else(|| Tensor::full([n], classes as i64, device))),
        }
    }

    /// The projected conditioning `[N, D]` the trunk adds to its conditioning vector: of the
    /// vectors (the zero vector, the null condition, when `c` has none) and of the token
    /// sequences' mean tokens (likewise), summed; None for a router that reads neither.
    fn extra_input(&self, c: &Condition, n: usize, device: &Device) -> Option<Tensor<2>> {
        let vector = self.c_embedder.as_ref().map(|proj| {
            let dc = proj.weight.dims()[0];
            proj.forward(c.vector.clone().unwrap_or_else(|| Tensor::zeros([n, dc], device))) // [N, D]
        });
        let tokens = self.c_tokens_embedder.as_ref().map(|proj| {
            let dt = proj.weight.dims()[0];
            let mean = c.tokens.as_ref().map(mean_token);
            proj.forward(mean.unwrap_or_else(|| Tensor::zeros([n, dt], device))) // [N, D]
        });
        match (vector, tokens) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        }
    }

    /// Cluster logits: of p(k | x_t, t, c) for a conditioned router, p(k | x_t, t) otherwise.
    /// Only the parts of `c` the router reads are read.
    ///
    /// # Shapes
    /// - `x_t`: `[N, X]` (flattened samples), `t`: `[N]`, `c`: N rows -> `[N, K]`
    pub fn logits(&self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Tensor<2> {
        let h = self.features(x_t, t, c);
        match &self.body {
            RouterBody::Dit(r) => r.head.forward(h), // [N, K]
            RouterBody::Mlp(m) => m.head(h),
        }
    }

    /// What the head reads: the pooled, normalised tokens (DiT), or the MLP's last hidden layer.
    /// An image classifier built like a router uses these as its feature space.
    ///
    /// # Shapes
    /// - `x_t`: `[N, X]`, `t`: `[N]`, `c`: N rows -> `[N, D]`
    pub fn features(&self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Tensor<2> {
        let [n, _] = x_t.dims();
        let device = x_t.device();
        let y = self.class_input(c.class.clone(), n, &device);
        let extra = self.extra_input(c, n, &device);
        match &self.body {
            RouterBody::Dit(r) => {
                let cfg = r.trunk.config();
                let x = x_t.reshape([n, cfg.in_channels, cfg.input_size, cfg.input_size]);
                let (tokens, _) = r.trunk.trunk(x, t, y, extra); // [N, T, D]
                layer_norm(tokens.mean_dim(1).reshape([n, cfg.hidden_size])) // [N, D]
            }
            RouterBody::Mlp(m) => m.features_with(x_t, t, y, extra),
        }
    }

    pub fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        let mut sd = match &self.body {
            RouterBody::Dit(r) => {
                let mut sd = r.trunk.state_dict();
                sd.linear("head", &r.head);
                sd
            }
            RouterBody::Mlp(m) => m.state_dict(),
        };
        if let Some(p) = &self.c_embedder {
            sd.linear("c_embedder", p);
        }
        if let Some(p) = &self.c_tokens_embedder {
            sd.linear("c_tokens_embedder", p);
        }
        sd.0
    }
}

/// The mean of each sequence's tokens, padding left out; zero for a sequence of padding only.
///
/// # Shapes
/// - `embeddings`: `[N, L, Dt]`, `mask`: `[N, L]` -> `[N, Dt]`
pub fn mean_token(tokens: &Tokens) -> Tensor<2> {
    let [n, l, dt] = tokens.embeddings.dims();
    let mask = tokens.mask.clone();
    let sum = (tokens.embeddings.clone() * mask.clone().reshape([n, l, 1])).sum_dim(1); // [N, 1, Dt]
    let count = mask.sum_dim(1).clamp_min(1.0); // [N, 1]
    sum.reshape([n, dt]) / count
}
