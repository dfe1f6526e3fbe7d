//! ddm-eval: how good are the samples, and does the ensemble beat the monolith?
//!
//! - [`fd`]: Fréchet distance between feature Gaussians;
//! - [`knn`]: improved precision / recall and nearest-neighbour distances;
//! - [`classifier`]: the Fashion-MNIST classifier whose features FD is measured in (trained by the
//!   trainer's loop; the committed weights are compiled in);
//! - [`images`]: all image metrics of a sample set, and the real-vs-real floor;
//! - [`mixture`]: exact metrics on Gaussian mixtures;
//! - [`experiment`], [`paper_table`] and [`report`]: `ddm experiment paper-table`, its runs,
//!   table and plot.

pub mod classifier;
pub mod experiment;
pub mod fd;
pub mod images;
pub mod knn;
pub mod mixture;
pub mod paper_table;
pub mod report;

/// The dataset a `--data` argument names (`download`: fetch Fashion-MNIST if it is missing).
pub fn load_data(data: &str, download: bool) -> anyhow::Result<ddm_datasets::Dataset> {
    use anyhow::Context;
    let source = ddm_datasets::parse_source(data, download)?;
    source
        .load()
        .with_context(|| format!("loading {}", source.describe()))
}
