//! Every data source, on small files the tests write, and each bad input the issue lists.

use std::io::Write;
use std::path::Path;

use ddm_datasets::dataset::Values;
use ddm_datasets::{Source, parse_source};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn idx_images(n: u32, r: u32, c: u32) -> Vec<u8> {
    let mut b = vec![];
    for v in [0x803, n, r, c] {
        b.extend(v.to_be_bytes());
    }
    b.extend((0..n * r * c).map(|i| (i % 251) as u8));
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![];
    b.extend(0x801u32.to_be_bytes());
    b.extend((labels.len() as u32).to_be_bytes());
    b.extend(labels);
    b
}

fn write_idx_dir(dir: &Path, images: &[u8], labels: &[u8], gzip: bool) {
    let (i, l) = if gzip {
        (gz(images), gz(labels))
    } else {
        (images.to_vec(), labels.to_vec())
    };
    let ext = if gzip { ".gz" } else { "" };
    std::fs::write(dir.join(format!("train-images-idx3-ubyte{ext}")), i).unwrap();
    std::fs::write(dir.join(format!("train-labels-idx1-ubyte{ext}")), l).unwrap();
}

fn load(arg: &str) -> Result<ddm_datasets::Dataset, String> {
    parse_source(arg, false)
        .map_err(|e| e.to_string())?
        .load()
        .map_err(|e| e.to_string())
}

#[test]
fn idx_gz_and_raw() {
    for gzip in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        write_idx_dir(
            dir.path(),
            &idx_images(5, 4, 3),
            &idx_labels(&[0, 1, 2, 1, 0]),
            gzip,
        );
        let d = load(&format!("idx:{}", dir.path().display())).unwrap();
        assert_eq!(
            (d.len(), d.shape.clone(), d.num_classes),
            (5, vec![1, 4, 3], Some(3))
        );
        assert_eq!(d.labels.as_deref(), Some(&[0, 1, 2, 1, 0][..]));
        // Pixels scale to [-1, 1]: byte 0 -> -1, byte 12 (first of sample 1) -> 12/127.5 - 1.
        let x = d.gather(&[1]);
        assert!((x[0] - (12.0 / 127.5 - 1.0)).abs() < 1e-6);
    }
}

#[test]
fn idx_bad_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let arg = format!("idx:{}", dir.path().display());
    let images = gz(&idx_images(5, 4, 3));
    // Truncated gz.
    write_idx_dir(dir.path(), &[], &idx_labels(&[0; 5]), true);
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte.gz"),
        &images[..images.len() / 2],
    )
    .unwrap();
    let e = load(&arg).unwrap_err();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("gzip"),
        "{e}"
    );
    // Wrong magic number.
    let mut bad = idx_images(5, 4, 3);
    bad[3] = 0x01;
    write_idx_dir(dir.path(), &bad, &idx_labels(&[0; 5]), true);
    let e = load(&arg).unwrap_err();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("magic number 0x00000801"),
        "{e}"
    );
    // Image/label count mismatch.
    write_idx_dir(dir.path(), &idx_images(5, 4, 3), &idx_labels(&[0; 4]), true);
    let e = load(&arg).unwrap_err();
    assert!(
        e.contains("train-labels-idx1-ubyte.gz") && e.contains("4 labels for 5 images"),
        "{e}"
    );
    // Header promising more than the file holds.
    let mut short = idx_images(5, 4, 3);
    short.truncate(30);
    write_idx_dir(dir.path(), &short, &idx_labels(&[0; 5]), false);
    std::fs::remove_file(dir.path().join("train-images-idx3-ubyte.gz")).unwrap();
    let e = load(&arg).unwrap_err();
    assert!(e.contains("header says 5 images"), "{e}");
}

#[test]
fn cifar10_batches() {
    let dir = tempfile::tempdir().unwrap();
    let record = |label: u8, v: u8| {
        std::iter::once(label)
            .chain(std::iter::repeat_n(v, 3072))
            .collect::<Vec<u8>>()
    };
    for i in 1..=5u8 {
        let b: Vec<u8> = [record(i, i * 10), record(9, 1)].concat();
        std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), b).unwrap();
    }
    let d = load(&format!("cifar10:{}", dir.path().display())).unwrap();
    assert_eq!((d.len(), d.shape.clone()), (10, vec![3, 32, 32]));
    assert_eq!(d.labels.as_ref().unwrap()[..4], [1, 9, 2, 9]);
    assert_eq!(d.image_bytes(2).unwrap()[0], 20);
    // A batch that is not whole records is named.
    std::fs::write(dir.path().join("data_batch_3.bin"), vec![0u8; 100]).unwrap();
    let e = load(&format!("cifar10:{}", dir.path().display())).unwrap_err();
    assert!(e.contains("data_batch_3.bin") && e.contains("3073-byte"), "{e}");
}

#[test]
fn image_folder_with_class_subdirectories() {
    let dir = tempfile::tempdir().unwrap();
    for (class, color) in [("cats", [200u8, 10, 10]), ("dogs", [10, 10, 200])] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_pixel(40 + i * 8, 30, image::Rgb(color));
            img.save(dir.path().join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let d = load(&format!("images:{}@16", dir.path().display())).unwrap();
    assert_eq!(
        (d.len(), d.shape.clone(), d.num_classes),
        (6, vec![3, 16, 16], Some(2))
    );
    assert_eq!(d.class_names.clone().unwrap(), vec!["cats", "dogs"]);
    assert_eq!(d.labels.clone().unwrap(), vec![0, 0, 0, 1, 1, 1]);
    let px = d.image_bytes(4).unwrap();
    assert_eq!((px[0], px[2 * 256]), (10, 200)); // CHW: red plane then blue plane
    // An unreadable image is named.
    std::fs::write(dir.path().join("dogs/broken.png"), b"not a png").unwrap();
    let e = load(&format!("images:{}", dir.path().display())).unwrap_err();
    assert!(e.contains("broken.png") && e.contains("unreadable image"), "{e}");
}

#[test]
fn safetensors_tensors_and_embeddings() {
    use ddm_core::host::{HostIntTensor, HostTensor, write_tensors};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("latents.safetensors");
    let x = HostTensor::new(vec![4, 2, 2, 2], (0..32).map(|v| v as f32 / 10.0).collect());
    let y = HostIntTensor {
        shape: vec![4],
        data: vec![0, 1, 1, 0],
    };
    write_tensors(
        &p,
        &BTreeMap::from([("x".into(), x)]),
        &BTreeMap::from([("y".into(), y)]),
    )
    .unwrap();
    let d = load(&format!("tensors:{}", p.display())).unwrap();
    assert_eq!((d.len(), d.shape.clone()), (4, vec![2, 2, 2]));
    assert!(matches!(d.values, Values::F32(_)));
    assert_eq!(d.gather(&[3])[0], 2.4);
    let emb = dir.path().join("emb.safetensors");
    let e = HostTensor::new(vec![3, 5], vec![0.0; 15]);
    write_tensors(
        &emb,
        &BTreeMap::from([("embeddings".into(), e)]),
        &BTreeMap::new(),
    )
    .unwrap();
    let err = ddm_datasets::tensors::read_embeddings(&emb, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("emb.safetensors") && err.contains("[4, E]"), "{err}");
}

/// Token sequences (`c_tokens`, `c_mask`) load with their samples and follow them into a subset;
/// a wrong shape, a mask that is not 0/1, or a constant `x` is refused, naming the file.
#[test]
fn tensors_files_carry_token_sequences() {
    use ddm_core::host::{HostTensor, write_tensors};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("captioned.safetensors");
    let write = |tensors: Vec<(&str, HostTensor)>| {
        let map = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        write_tensors(&p, &map, &BTreeMap::new()).unwrap();
    };
    let x = HostTensor::new(vec![3, 4], (0..12).map(|v| v as f32).collect());
    let tokens = HostTensor::new(vec![3, 2, 5], (0..30).map(|v| v as f32).collect());
    let mask = HostTensor::new(vec![3, 2], vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    write(vec![
        ("x", x.clone()),
        ("c_tokens", tokens.clone()),
        ("c_mask", mask.clone()),
    ]);
    let d = load(&format!("tensors:{}", p.display())).unwrap();
    let t = d.subset(&[1]).tokens.unwrap();
    assert_eq!(
        (t.embeddings.data, t.mask.data),
        ((10..20).map(|v| v as f32).collect(), vec![1.0, 0.0])
    );
    let bad_mask = HostTensor::new(vec![3, 2], vec![1.0, 0.5, 1.0, 0.0, 1.0, 1.0]);
    let short = HostTensor::new(vec![2, 2, 5], vec![0.0; 20]);
    let constant = HostTensor::new(vec![3, 4], vec![0.5; 12]);
    for (tensors, says) in [
        (
            vec![
                ("x", x.clone()),
                ("c_tokens", tokens.clone()),
                ("c_mask", bad_mask),
            ],
            "`c_mask` holds 0.5",
        ),
        (
            vec![("x", x.clone()), ("c_tokens", short), ("c_mask", mask.clone())],
            "expected [3, L, Dt]",
        ),
        (vec![("x", constant)], "holds one value (0.5)"),
    ] {
        write(tensors);
        let err = load(&format!("tensors:{}", p.display())).unwrap_err();
        assert!(
            err.contains("captioned.safetensors") && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn gaussian_mixture_spec_travels_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gmm.json");
    std::fs::write(&p, r#"{"weights": [0.25, 0.75], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.2, 0.2]], "n": 4000, "seed": 1}"#).unwrap();
    let d = load(&format!("gmm:{}", p.display())).unwrap();
    assert_eq!((d.len(), d.shape.clone()), (4000, vec![2]));
    let frac = d.labels.as_ref().unwrap().iter().filter(|&&l| l == 0).count() as f64 / 4000.0;
    assert!((frac - 0.25).abs() < 0.03, "{frac}");
    assert_eq!(d.mixture.as_ref().unwrap().weights, vec![0.25, 0.75]);
    assert_eq!(
        d.fingerprint(),
        load(&format!("gmm:{}", p.display())).unwrap().fingerprint()
    );
    std::fs::write(
        &p,
        r#"{"weights": [0.5, 0.6], "means": [[0], [1]], "vars": [[1], [1]]}"#,
    )
    .unwrap();
    let e = load(&format!("gmm:{}", p.display())).unwrap_err();
    assert!(e.contains("gmm.json") && e.contains("sum to"), "{e}");
}

#[test]
fn unknown_data_argument_lists_the_choices() {
    let e = parse_source("mnist-ish", false).err().unwrap().to_string();
    assert!(e.contains("fashion-mnist") && e.contains("cifar10:DIR"), "{e}");
}

/// A Fashion-MNIST mirror on loopback for four requests: Debian's files (a placeholder where they
/// are not installed), or, `corrupt`, bytes that are not Fashion-MNIST. Returns its URL.
fn mirror(corrupt: bool) -> String {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let mut stream = stream.unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let name = line
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_start_matches('/')
                .to_string();
            let mut body = std::fs::read(Path::new(ddm_datasets::idx::DEBIAN_FASHION_MNIST).join(&name))
                .unwrap_or_else(|_| gz(b"placeholder"));
            if corrupt {
                body = gz(b"not fashion-mnist");
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        }
    });
    format!("http://{addr}")
}

/// A corrupted download is refused by its checksum and nothing is put in place.
#[test]
fn download_verifies_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let e = ddm_datasets::idx::download_fashion_mnist(&mirror(true), dir.path(), &())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("sha256"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is kept from a bad download"
    );
}

/// A good mirror (serving Debian's files) fills the cache, which then loads.
#[test]
#[ignore = "needs Debian's dataset-fashion-mnist (.ci/run installs it)"]
fn download_from_a_good_mirror_fills_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    ddm_datasets::idx::download_fashion_mnist(&mirror(false), dir.path(), &()).unwrap();
    let d = ddm_datasets::idx::FashionMnist {
        dir: Some(dir.path().into()),
        split: ddm_datasets::idx::Split::Test,
        download: false,
    }
    .load()
    .unwrap();
    assert_eq!(d.len(), 10_000);
}
