//! `ddm train`: the island trainer (the same code as the `ddm-trainer` binary).

pub use ddm_trainer::cli::{TrainArgs, run};
