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
            condition: None,
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
                "sample",
                "--registry",
                "reg",
                "--router",
                router,
                "--strategy",
                "full",
                "--n",
                "4",
                "--steps",
                "2",
                "--out",
                "s.png",
            ],
        )
    };
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    ok(sample("analytic"));

    edit_index(d, |idx| idx["stats"]["0"] = idx["stats"]["1"].clone());
    let e = fails(ddm(d, &["registry", "--registry", "reg", "verify"]));
    assert!(
        e.contains("statistics 0")
            && e.contains("registered as statistics 0")
            && e.contains("the statistics of cluster 1"),
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
    assert!(
        e.contains("registered as expert 0") && e.contains("registered as expert 1"),
        "{e}"
    );
    let e = fails(sample("analytic"));
    assert!(e.contains("registered as expert"), "{e}");

    std::fs::write(d.join("reg/registry.json"), &original).unwrap();
    edit_index(d, |idx| idx["router"] = idx["experts"]["0"].clone());
    let e = fails(ddm(d, &["registry", "--registry", "reg", "verify"]));
    assert!(
        e.contains("registered as the router") && e.contains("a checkpoint whose role is expert"),
        "{e}"
    );
}

/// `ddm sample --out NAME.png` writes NAME.safetensors and NAME.json beside the grid: names that
/// differ never share an output (`run.v1.png`, `run.v2.png` once both wrote `run.safetensors`),
/// and a name that is not a PNG's is refused before sampling (`x.safetensors` was overwritten by
/// its own samples).
#[test]
fn sample_outputs_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_with_stats(d);
    let sample = |out: &str, seed: &str| {
        ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--router",
                "analytic",
                "--strategy",
                "full",
                "--n",
                "4",
                "--steps",
                "2",
                "--seed",
                seed,
                "--out",
                out,
            ],
        )
    };
    ok(sample("run.v1.png", "1"));
    ok(sample("run.v2.png", "2"));
    let x0 = |name: &str| {
        ddm_core::host::TensorFile::read(&d.join(name))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    assert_ne!(x0("run.v1.safetensors"), x0("run.v2.safetensors"));
    for report in ["run.v1.json", "run.v2.json"] {
        assert!(d.join(report).exists(), "{report}");
    }
    for bad in ["x.safetensors", "x.json", "samples"] {
        let e = fails(sample(bad, "1"));
        assert!(e.contains(&format!("--out {bad}")) && e.contains(".png"), "{e}");
        assert!(!d.join(bad).exists());
    }
}

/// Data whose values are not finite is refused where it is read, naming the file: it would have
/// become a partition whose recorded range is `null`, which ddm then could not read back. A
/// mixture spec that asks for more samples than memory holds is refused before drawing them.
#[test]
fn non_finite_and_oversized_data_is_refused_at_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = ddm_core::host::HostTensor::new(vec![4, 2], vec![0.0, 1.0, f32::NAN, 2.0, 3.0, 4.0, 5.0, 6.0]);
    ddm_core::host::write_tensors(
        &d.join("nan.safetensors"),
        &[("x".to_string(), x)].into(),
        &Default::default(),
    )
    .unwrap();
    let e = fails(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:nan.safetensors",
            "--k",
            "2",
            "--out",
            "p",
        ],
    ));
    assert!(e.contains("nan.safetensors") && e.contains("NaN"), "{e}");
    for (spec, says) in [
        (
            r#"{"weights": [1.0], "means": [[1e400]], "vars": [[1]]}"#,
            "not a mixture spec",
        ),
        (
            r#"{"weights": [1.0], "means": [[0]], "vars": [[1]], "n": 1000000000000}"#,
            "n must be",
        ),
        (
            r#"{"weights": [1.0], "means": [[0]], "vars": [[1]], "n": 0}"#,
            "n must be",
        ),
    ] {
        std::fs::write(d.join("gmm.json"), spec).unwrap();
        let e = fails(ddm(
            d,
            &["partition", "--data", "gmm:gmm.json", "--k", "2", "--out", "p"],
        ));
        assert!(e.contains("gmm.json") && e.contains(says), "{spec}: {e}");
    }
}
