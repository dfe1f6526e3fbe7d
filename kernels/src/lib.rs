//! ddm-kernels: where ddm's CPU time goes, written by hand. [`fused`] holds the DiT block's
//! element-wise chains (tanh GELU, LayerNorm + adaLN modulation, gated residual, attention) as
//! single ops with hand-written backwards; [`group_norm`] the VAE's GroupNorm + SiLU likewise;
//! [`update`] the AdamW step and the EMA as one pass over each parameter. All are burn backend
//! extensions: on the CPU backend they run these kernels, on any other device the same operations
//! composed of burn ops. `ddm-core` re-exports these modules; nothing here knows about models, so
//! the model code depends on the kernels and not the reverse. The tests live with the model
//! (`core/tests/fused.rs`, `core/tests/update.rs`).

pub mod fused;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod group_norm;
pub mod update;
