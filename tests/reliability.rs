//! Drills for the third reliability pass: registry entries bound to what they claim, output names
//! that never collide, non-finite results refused at the boundaries, numeric flags at their
//! types' extremes.

use std::path::{Path, PathBuf};

mod common;
use common::{ddm, fails, ok, registry_fixture};

/// A registry with K = 2 MLP experts, each with its cluster's statistics (for the analytic
/// router), registered from `island-K/`.
fn registry_with_stats(d: &Path) -> Vec<PathBuf> {
    let experts = registry_fixture(d, 2);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("p/partition.json")).unwrap()).unwrap();
    let fp = manifest["fingerprint"].as_str().unwrap();
    let mut registered = vec![];
    for (c, e) in experts.iter().enumerate() {
        let island = d.join(format!("island-{c}"));
        std::fs::create_dir_all(&island).unwrap();
        let expert = island.join("expert.safetensors");
        std::fs::rename(e, &expert).unwrap();
        let sign = if c == 0 { -3.0 } else { 3.0 };
        let stats = ddm_core::stats::ClusterStats {
            count: 200,
            mean: vec![sign, 0.0],
            var: vec![0.1, 0.1],
            label_counts: None,
        };
        stats
            .save(&island.join(ddm_core::stats::STATS_FILE), Some(c), fp)
            .unwrap();
        registered.push(expert);
    }
    let mut args = vec!["register", "--registry", "reg", "--partition", "p"];
    let paths: Vec<String> = registered.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    ok(ddm(d, &args));
    registered
}

fn edit_index(d: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("reg/registry.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut idx);
    std::fs::write(&p, serde_json::to_vec_pretty(&idx).unwrap()).unwrap();
}

/// An index entry pointing at another entry's blob (whose sha256 is right) is refused by `verify`
/// and by sampling: cluster 0's statistics replaced by cluster 1's (the analytic router would send
/// every sample to one expert), the two experts swapped, the router slot given an expert.
#[test]
fn index_entries_are_bound_to_what_they_claim() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_with_stats(d);
    let original = std::fs::read(d.join("reg/registry.json")).unwrap();
    let sample = |router: &str| {
        ddm(
            d,
            &[
                "sample", "--registry", "reg", "--router", router, "--strategy", "full", "--n", "4", "--steps", "2",
                "--out", "s.png",
            ],
        )
    };
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    ok(sample("analytic"));

    edit_index(d, |idx| idx["stats"]["0"] = idx["stats"]["1"].clone());
    let e = fails(ddm(d, &["registry", "--registry", "reg", "verify"]));
    assert!(
        e.contains("statistics 0") && e.contains("registered as statistics 0") && e.contains("the statistics of cluster 1"),
        "{e}"
    );
    let e = fails(sample("analytic"));
    assert!(e.contains("registered as statistics 0"), "{e}");

    std::fs::write(d.join("reg/registry.json"), &original).unwrap();
    edit_index(d, |idx| {
        let zero = idx["experts"]["0"].clone();
        idx["experts"]["0"] = idx["experts"]["1"].clone();
        idx["experts"]["1"] = zero;
    });
    let e = fails(ddm(d, &["registry", "--registry", "reg", "verify"]));
    assert!(e.contains("registered as expert 0") && e.contains("registered as expert 1"), "{e}");
    let e = fails(sample("analytic"));
    assert!(e.contains("registered as expert"), "{e}");

    std::fs::write(d.join("reg/registry.json"), &original).unwrap();
    edit_index(d, |idx| idx["router"] = idx["experts"]["0"].clone());
    let e = fails(ddm(d, &["registry", "--registry", "reg", "verify"]));
    assert!(e.contains("registered as the router") && e.contains("a checkpoint whose role is expert"), "{e}");
}
