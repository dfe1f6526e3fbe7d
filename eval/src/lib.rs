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
