//! ddm-ensemble: jobs 2 and 3 of the mission. [`registry`] collects experts and the router into a
//! verified, content-addressed directory; [`sampler`] mixes them at every denoising step through a
//! routing [`strategy`], with grouped dispatch (each expert runs once per step). [`remote`] is the
//! wire format of experts served over HTTP (`ddm serve`) and the sampler's client of them.

pub mod experts;
pub mod posterior;
pub mod registry;
pub mod remote;
pub mod sample;
pub mod sampler;
pub mod slots;
pub mod strategy;
