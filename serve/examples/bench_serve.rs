//! Benchmark (not a test) of served experts, on loopback:
//!
//! 1. one `ddm serve` of expert 0: requests per second and p50 / p99 latency at batch 64 with 1, 4
//!    and 16 concurrent clients, with coalescing (--max-wait-ms 2) and without (0);
//! 2. a full-ensemble sampling step: the K experts in K server processes vs in-process
//!    (`ddm sample --strategy full`, seconds per step from its report; runs alternate).
//!
//! cargo build --release && cargo run --release -p ddm-serve --example bench_serve -- REGISTRY \
//!     [--ddm target/release/ddm] [--seconds 8] [--reps 3]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddm_core::host::HostTensor;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::remote::Request;

struct Server(Child, String);

impl Server {
    fn start(ddm: &Path, registry: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(ddm)
            .args(["serve", "--registry"])
            .arg(registry)
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env_remove("DDM_SERVE_TOKEN")
            .spawn()
            .expect("ddm serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("ddm serve did not start: {line}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        Server(child, url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `clients` threads, each sending batch-`batch` requests back to back for `seconds`.
fn load(url: &str, clients: usize, batch: usize, per: usize, seconds: f64) -> (f64, f64, f64, usize) {
    let body = Request {
        x_t: HostTensor::new(
            vec![batch, per],
            (0..batch * per)
                .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
                .collect(),
        ),
        t: (0..batch).map(|i| 0.1 + 0.8 * i as f32 / batch as f32).collect(),
        y: None,
        c: None,
        tokens: None,
    }
    .to_bytes()
    .unwrap();
    let endpoint = format!("{url}/v1/experts/0/velocity");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (body, endpoint) = (body.clone(), endpoint.clone());
                s.spawn(move || {
                    let http = ddm_net::client().unwrap();
                    let mut lat = vec![];
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let r = http.post(&endpoint).body(body.clone()).send().unwrap();
                        assert!(r.status().is_success(), "{}", r.status());
                        r.bytes().unwrap();
                        lat.push(t0.elapsed().as_secs_f64());
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let n = latencies.len();
    (
        n as f64 / wall,
        percentile(&latencies, 0.5) * 1e3,
        percentile(&latencies, 0.99) * 1e3,
        n,
    )
}

fn seconds_per_step(ddm: &Path, registry: &Path, out: &Path) -> f64 {
    let st = Command::new(ddm)
        .args(["sample", "--registry"])
        .arg(registry)
        .args([
            "--strategy",
            "full",
            "--n",
            "64",
            "--steps",
            "10",
            "--quiet",
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    report["seconds_per_step"].as_f64().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let registry = PathBuf::from(
        args.get(1)
            .expect("usage: bench_serve REGISTRY [--ddm PATH] [--seconds S] [--reps R]"),
    );
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let ddm = PathBuf::from(flag("--ddm").unwrap_or_else(|| "target/release/ddm".into()));
    let seconds: f64 = flag("--seconds").map_or(8.0, |s| s.parse().unwrap());
    let reps: usize = flag("--reps").map_or(3, |s| s.parse().unwrap());
    let reg = Registry::open(&registry).unwrap();
    let per: usize = reg.index.data.shape.iter().product();
    let k = reg.index.k;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    println!(
        "{cpu}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    println!("\n1. one server, expert 0, {seconds} s per cell (default --max-batch-rows 256)");
    println!(
        "| rows per request | coalescing | clients | requests/s | rows/s | p50 ms | p99 ms | requests |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for batch in [64, 4] {
        for (label, wait) in [("off (--max-wait-ms 0)", "0"), ("on (--max-wait-ms 2)", "2")] {
            let server = Server::start(&ddm, &registry, &["--experts", "0", "--max-wait-ms", wait]);
            load(&server.1, 1, batch, per, 1.0); // warm-up
            for clients in [1, 4, 16] {
                let (rps, p50, p99, n) = load(&server.1, clients, batch, per, seconds);
                let rows = rps * batch as f64;
                println!(
                    "| {batch} | {label} | {clients} | {rps:.1} | {rows:.0} | {p50:.1} | {p99:.1} | {n} |"
                );
            }
        }
    }

    println!(
        "\n2. full-ensemble sampling step (K = {k}, n = 64, 10 steps): in-process vs {k} server processes"
    );
    let work = tempfile_dir();
    let remote_reg = work.join("remote");
    let servers: Vec<Server> = (0..k)
        .map(|e| Server::start(&ddm, &registry, &["--experts", &e.to_string()]))
        .collect();
    let router = reg
        .index
        .router
        .as_ref()
        .expect("the registry has a router")
        .blob(&reg.dir);
    let st = Command::new(&ddm)
        .args(["register", "--registry"])
        .arg(&remote_reg)
        .arg(&router)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    for s in &servers {
        let st = Command::new(&ddm)
            .args(["register", "--registry"])
            .arg(&remote_reg)
            .args(["--remote", &s.1])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let (mut local, mut remote) = (vec![], vec![]);
    for _ in 0..reps {
        local.push(seconds_per_step(&ddm, &registry, &work.join("local.png")));
        remote.push(seconds_per_step(&ddm, &remote_reg, &work.join("remote.png")));
    }
    println!("in-process      s/step: {local:.3?}");
    println!("{k} server procs s/step: {remote:.3?}");
    let x0 = |f: &str| {
        ddm_core::host::TensorFile::read(&work.join(f))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    let (a, b) = (x0("local.safetensors"), x0("remote.safetensors"));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    println!("samples, served vs in-process: max |diff| = {diff:e}");
    let _ = std::fs::remove_dir_all(&work);
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddm-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
