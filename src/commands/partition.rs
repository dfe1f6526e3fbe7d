//! `ddm partition`: cluster a dataset and write one shard per cluster (the islands' inputs).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use ddm_datasets::features::{Distance, FeatureMethod};
use ddm_datasets::partition::{self, Algorithm, PartitionConfig};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    /// Plain k-means (k-means++ initialisation, Lloyd iterations).
    Kmeans,
    /// The paper's two-stage k-means: --fine centroids first, then K coarse clusters over them.
    TwoStage,
    /// Random equal-size shards (the baseline the paper compares against).
    Random,
}

/// Split a dataset into K clusters and write the partition directory: partition.json, centroids,
/// the per-sample assignment, and one shard file per cluster (all one island needs).
///
/// With --describe DIR, print the clusters of an existing partition (count, prior, dominant labels)
/// and write a PNG with a row of example images per cluster.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct PartitionArgs {
    /// Describe an existing partition directory instead of making one.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out"])]
    pub describe: Option<PathBuf>,
    /// Where the examples PNG of --describe goes (default DIR/clusters.png).
    #[arg(long, requires = "describe")]
    pub png: Option<PathBuf>,
    /// The data: fashion-mnist[:DIR|:test], fashion-mnist-10k (embedded), default, idx:DIR,
    /// cifar10:DIR, images:DIR[@SIZE], tensors:FILE, gmm:SPEC.json.
    #[arg(long, default_value = "default")]
    pub data: String,
    /// Number of clusters (islands).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_CLUSTERS), default_value_t = 4)]
    pub k: usize,
    /// The partition directory to write.
    #[arg(long, required_unless_present = "describe")]
    pub out: Option<PathBuf>,
    /// Clustering features: raw, pca:<dims>, or embeddings:<file.safetensors> (`embeddings` [N, E]).
    #[arg(long, default_value = "pca:64")]
    pub features: String,
    /// Distance: l2 or cosine.
    #[arg(long, default_value = "l2")]
    pub distance: String,
    #[arg(long, value_enum, default_value = "two-stage")]
    pub algorithm: AlgorithmArg,
    /// Fine centroids of the two-stage algorithm.
    #[arg(long, value_parser = super::values::count(1, 1 << 20), default_value_t = 1024)]
    pub fine: usize,
    /// At most this many samples fit the fine centroids (two-stage).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 20_000)]
    pub subsample: usize,
    /// k-means iterations at most.
    #[arg(long, value_parser = super::values::count(1, 100_000), default_value_t = 100)]
    pub max_iter: usize,
    /// k-means restarts (the lowest inertia wins).
    #[arg(long, value_parser = super::values::count(1, 1000), default_value_t = 1)]
    pub n_init: usize,
    /// Mini-batch k-means with batches of this size.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES))]
    pub batch_size: Option<usize>,
    /// Balanced clusters: each gets at most ceil(N / K) samples.
    #[arg(long)]
    pub balanced: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Allow downloading Fashion-MNIST when it is not on disk.
    #[arg(long)]
    pub download: bool,
    /// Print partition.json's summary as JSON (on stdout) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const EXAMPLES: &str = "Examples:
  ddm partition --data fashion-mnist --k 8 --out part
  ddm partition --data images:photos@64 --k 4 --features pca:128 --algorithm kmeans --out part
  ddm partition --describe part --png part/clusters.png";

pub fn run(args: PartitionArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.describe {
        let png = args.png.clone().unwrap_or_else(|| dir.join("clusters.png"));
        let table = partition::describe(dir, Some(&png), 12)?;
        match args.json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(&partition::read_manifest(dir)?)?
            ),
            false => print!("{table}"),
        }
        return Ok(());
    }
    let out = args.out.clone().expect("clap requires --out without --describe");
    let config = PartitionConfig {
        k: args.k,
        features: args.features.parse::<FeatureMethod>()?,
        distance: args.distance.parse::<Distance>()?,
        algorithm: match args.algorithm {
            AlgorithmArg::Kmeans => Algorithm::Kmeans {
                max_iter: args.max_iter,
                n_init: args.n_init,
                batch_size: args.batch_size,
                balanced: args.balanced,
            },
            AlgorithmArg::TwoStage => {
                if args.balanced || args.batch_size.is_some() {
                    bail!("--balanced and --batch-size apply to --algorithm kmeans");
                }
                Algorithm::TwoStage {
                    fine: args.fine,
                    subsample: args.subsample,
                    max_iter: args.max_iter,
                }
            }
            AlgorithmArg::Random => Algorithm::Random,
        },
        seed: args.seed,
    };
    // Before any work: an existing output must be a partition to replace.
    ddm_datasets::partition::write::check_replaceable(&out, args.force)?;
    // Clustering can take minutes: find an unwritable --out before it.
    ddm_core::fsio::check_writable(&out)?;
    let source = ddm_datasets::parse_source(&args.data, args.download)?;
    tracing::info!("loading {}", source.describe());
    let dataset = source
        .load()
        .with_context(|| format!("loading {}", source.describe()))?;
    tracing::info!(
        "clustering {} samples into K = {} ({:?}, features {})",
        dataset.len(),
        args.k,
        config.algorithm,
        config.features
    );
    let t0 = Instant::now();
    let clustering = partition::cluster_with(&dataset, &config, &crate::ui::Bar::new(args.quiet))?;
    let seconds = t0.elapsed().as_secs_f64();
    let m = partition::write(&out, &dataset, &config, &clustering, seconds, args.force)?;
    tracing::info!("clustered in {seconds:.2} s");
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!(
        "wrote {} (fingerprint {})",
        out.display(),
        ddm_core::text::short(&m.fingerprint, 12)
    );
    print!("{}", partition::describe(&out, None, 0)?);
    Ok(())
}
