//! Experts over the network, on loopback: `ddm serve` answers what a local expert computes, refuses
//! bad requests with the right status and keeps serving, coalesces concurrent requests, finishes
//! in-flight requests on SIGTERM; the sampler mixes served and local experts, and survives (with
//! --allow-missing) or reports a server killed mid-sampling; https downloads trust a root given in
//! DDM_CA_CERT and resume after an interruption.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use ddm_core::flow::VelocityField;
use ddm_core::host::{HostTensor, TensorFile};
use ddm_ensemble::remote::Request;

mod common;
use common::{Server, ddm, fails, ok, registry_fixture, registry_fixture_with};

/// The value of the first `/metrics` line starting with `prefix`.
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn client() -> reqwest::blocking::Client {
    ddm_net::client().unwrap()
}

fn request(rows: usize, seed: u64) -> Request {
    let x: Vec<f32> = (0..rows * 2)
        .map(|i| ((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 125.0 - 4.0)
        .collect();
    let t: Vec<f32> = (0..rows)
        .map(|i| ((i as u64 + seed) % 10) as f32 / 10.0 + 0.05)
        .collect();
    Request {
        x_t: HostTensor::new(vec![rows, 2], x),
        t,
        y: None,
        c: None,
        tokens: None,
    }
}

/// The expert checkpoint's own velocity, computed in this process.
fn local_velocity(checkpoint: &Path, r: &Request) -> Vec<f32> {
    let device = ddm_core::device::cpu();
    let (_, model) = ddm_core::checkpoint::load(checkpoint, &device).unwrap();
    let n = r.rows();
    let v = model
        .velocity(
            r.x_t.to_tensor::<2>(&device),
            HostTensor::new(vec![n], r.t.clone()).to_tensor::<1>(&device),
            &ddm_core::condition::Condition::none(),
        )
        .unwrap();
    HostTensor::from_tensor(v).data
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn post(http: &reqwest::blocking::Client, url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut r = http.post(url).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().unwrap();
    (resp.status().as_u16(), resp.bytes().unwrap().to_vec())
}

fn velocity_of(body: &[u8]) -> HostTensor {
    TensorFile::from_bytes(Path::new("answer"), body.to_vec())
        .unwrap()
        .f32("v")
        .unwrap()
}

#[test]
fn served_experts_equal_local_ones_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    let mut args = vec!["register", "--registry", "reg", "--partition", "p"];
    args.extend(experts.iter().map(|e| e.to_str().unwrap()));
    ok(ddm(dir.path(), &args));
    let token = "s3cret-token";
    let server = Server::start(
        dir.path(),
        &[
            "--registry",
            "reg",
            "--max-rows",
            "64",
            "--max-body-mib",
            "1",
            "--max-wait-ms",
            "300",
        ],
        Some(token),
    );
    let http = client();
    let base = server.url.clone();
    let v1 = format!("{base}/v1/experts/1/velocity");

    // Health needs no token; everything else does.
    assert_eq!(http.get(format!("{base}/health")).send().unwrap().status(), 200);
    let meta = format!("{base}/v1/metadata");
    assert_eq!(http.get(&meta).send().unwrap().status(), 401);
    assert_eq!(http.get(&meta).bearer_auth("wrong").send().unwrap().status(), 401);
    let m: serde_json::Value = http.get(&meta).bearer_auth(token).send().unwrap().json_or_panic();
    let sha1 = ddm_core::digest::sha256_file(&experts[1]).unwrap();
    assert_eq!(m["experts"]["1"]["sha256"], sha1.as_str());
    assert_eq!(m["experts"]["1"]["meta"]["cluster"], 1);
    assert_eq!(m["k"], 2);

    // A served expert computes what the checkpoint computes here.
    let r = request(16, 1);
    let (status, body) = post(&http, &v1, Some(token), r.to_bytes().unwrap());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v = velocity_of(&body);
    assert_eq!(v.shape, vec![16, 2]);
    let d = max_diff(&v.data, &local_velocity(&experts[1], &r));
    println!("served vs local velocity: max |diff| = {d:e}");
    assert!(d <= 1e-6, "served velocity differs from the local one by {d}");
    let (status, _) = post(&http, &v1, None, r.to_bytes().unwrap());
    assert_eq!(status, 401);

    // Bad requests: a status and a reason, and the server keeps serving.
    let (status, body) = post(&http, &v1, Some(token), b"not safetensors at all".to_vec());
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("request body"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let wide = Request {
        x_t: HostTensor::new(vec![2, 3], vec![0.0; 6]),
        t: vec![0.5, 0.5],
        y: None,
        c: None,
        tokens: None,
    };
    let (status, body) = post(&http, &v1, Some(token), wide.to_bytes().unwrap());
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("shape"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let mut late = request(2, 3);
    late.t = vec![0.5, 1.5];
    assert_eq!(post(&http, &v1, Some(token), late.to_bytes().unwrap()).0, 400);
    let mut labelled = request(2, 3);
    labelled.y = Some(vec![0, 1]);
    let (status, body) = post(&http, &v1, Some(token), labelled.to_bytes().unwrap());
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not class-conditional"));
    assert_eq!(
        post(&http, &v1, Some(token), request(65, 0).to_bytes().unwrap()).0,
        413
    );
    // A body over the limit is answered 413 as soon as its declared length is read, and the
    // connection closed: a client still writing the body may see the close before the answer.
    let big = http.post(&v1).bearer_auth(token).body(vec![0u8; 2 << 20]).send();
    match big {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(e) => assert!(format!("{e:?}").contains("BodyWrite"), "{e:?}"),
    }
    let (status, _) = post(
        &http,
        &format!("{base}/v1/experts/7/velocity"),
        Some(token),
        r.to_bytes().unwrap(),
    );
    assert_eq!(status, 404);
    let (status, body) = post(&http, &v1, Some(token), r.to_bytes().unwrap());
    assert_eq!(status, 200);
    assert_eq!(
        velocity_of(&body).data,
        v.data,
        "the same request, the same answer"
    );

    // Concurrent requests are coalesced, and each gets its own rows back.
    let requests = 8;
    let barrier = Arc::new(Barrier::new(requests));
    let answers: Vec<(Request, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..requests)
            .map(|i| {
                let (barrier, http, v1) = (barrier.clone(), &http, &v1);
                s.spawn(move || {
                    let r = request(3 + i, 10 + i as u64);
                    barrier.wait();
                    let (status, body) = post(http, v1, Some(token), r.to_bytes().unwrap());
                    assert_eq!(status, 200);
                    (r, velocity_of(&body).data)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, v) in &answers {
        assert!(max_diff(v, &local_velocity(&experts[1], r)) <= 1e-6);
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let value = |prefix: &str| metric(&metrics, prefix);
    let forwards = value("ddm_batches_total{model=\"expert 1\"}");
    let rows = value("ddm_rows_total{model=\"expert 1\"}");
    println!("expert 1: {forwards} forwards for 10 good requests, {rows} rows");
    assert_eq!(rows, (16 + 16 + (3..3 + requests).sum::<usize>()) as f64);
    assert!(
        forwards < 10.0,
        "8 concurrent requests were not coalesced ({forwards} forwards)"
    );
    assert!(
        metrics.contains("endpoint=\"/v1/experts/{k}/velocity\",status=\"400\""),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"413\""), "{metrics}");
    assert!(metrics.contains("status=\"401\""), "{metrics}");

    // SIGTERM while a request waits in the batcher (a server that holds each batch open for 3 s,
    // so the request is surely in flight when the signal comes): it is answered, then the server
    // exits 0.
    drop(server);
    let mut server = Server::start(
        dir.path(),
        &["--registry", "reg", "--max-wait-ms", "3000"],
        Some(token),
    );
    let v1 = format!("{}/v1/experts/1/velocity", server.url);
    let answer = std::thread::scope(|s| {
        let h = s.spawn(|| post(&client(), &v1, Some(token), request(4, 99).to_bytes().unwrap()));
        std::thread::sleep(Duration::from_millis(1000));
        server.signal(libc::SIGTERM);
        h.join().unwrap()
    });
    assert_eq!(answer.0, 200, "the in-flight request was not answered");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "ddm serve exited with {status} after SIGTERM");
}

trait JsonOrPanic {
    fn json_or_panic(self) -> serde_json::Value;
}

impl JsonOrPanic for reqwest::blocking::Response {
    fn json_or_panic(self) -> serde_json::Value {
        let status = self.status();
        let text = self.text().unwrap();
        assert!(status.is_success(), "{status}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

#[test]
fn a_non_loopback_address_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 1);
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ],
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(["serve", "--registry", "reg", "--listen", "0.0.0.0:0"])
        .env_remove("DDM_SERVE_TOKEN")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let e = fails(out);
    assert!(e.contains("not a loopback address, and no token"), "{e}");
}

fn report(dir: &Path, stem: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap()
}

fn samples(dir: &Path, stem: &str) -> Vec<f32> {
    TensorFile::read(&dir.join(format!("{stem}.safetensors")))
        .unwrap()
        .f32("x0")
        .unwrap()
        .data
}

#[test]
fn remote_experts_sample_like_local_ones_and_a_lost_server_is_survived_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    let (e0, e1) = (experts[0].to_str().unwrap(), experts[1].to_str().unwrap());
    ok(ddm(
        d,
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--mlp-hidden",
            "16",
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--eval-samples",
            "50",
            "--quiet",
        ],
    ));
    let router = "r/router.safetensors";
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "local",
            "--partition",
            "p",
            e0,
            e1,
            router,
        ],
    ));
    // Island 1 serves its expert; the sampler's registry holds expert 0 locally and 1 remotely.
    ok(ddm(
        d,
        &["register", "--registry", "island-1", "--partition", "p", e1],
    ));
    let server = Server::start(d, &["--registry", "island-1"], None);
    ok(ddm(
        d,
        &["register", "--registry", "mixed", "--partition", "p", e0, router],
    ));
    let out = ok(ddm(
        d,
        &["register", "--registry", "mixed", "--remote", &server.url],
    ));
    assert!(out.contains("expert 1"), "{out}");
    let list = ok(ddm(d, &["registry", "--registry", "mixed", "list"]));
    assert!(list.contains(&format!("served at {}", server.url)), "{list}");
    ok(ddm(d, &["registry", "--registry", "mixed", "verify"]));
    // A server's expert must belong to the registry's partition.
    let other = tempfile::tempdir().unwrap();
    registry_fixture(other.path(), 3);
    let e = fails(ddm(
        d,
        &[
            "register",
            "--registry",
            "other",
            "--partition",
            &other.path().join("p").display().to_string(),
            "--remote",
            &server.url,
        ],
    ));
    assert!(e.contains("but this registry is for partition"), "{e}");

    // The same samples, served or local.
    let sample = |reg: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--registry",
            reg,
            "--strategy",
            "full",
            "--n",
            "32",
            "--steps",
            "10",
            "--quiet",
        ];
        args.extend(["--out", out]);
        args.extend(extra);
        ddm(d, &args)
    };
    ok(sample("local", "local.png", &[]));
    ok(sample("mixed", "mixed.png", &[]));
    let diff = max_diff(&samples(d, "local"), &samples(d, "mixed"));
    println!("samples, served vs local experts: max |diff| = {diff:e}");
    assert!(diff <= 1e-6, "served and local samples differ by {diff}");
    let rep = report(d, "mixed");
    assert_eq!(rep["experts_remote"], serde_json::json!([1]));
    assert_eq!(rep["experts_lost"], serde_json::json!([]));

    // The router, served: the logits of the checkpoint.
    let router_server = Server::start(d, &["--registry", "local", "--router"], None);
    let r = request(8, 5);
    let (status, body) = post(
        &client(),
        &format!("{}/v1/router/logits", router_server.url),
        None,
        r.to_bytes().unwrap(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let served = TensorFile::from_bytes(Path::new("answer"), body)
        .unwrap()
        .f32("logits")
        .unwrap();
    assert_eq!(served.shape, vec![8, 2]);
    let device = ddm_core::device::cpu();
    let path = d.join(router);
    let net = ddm_router::net::RouterNet::from_checkpoint(
        &path,
        ddm_core::checkpoint::Checkpoint::read(&path).unwrap(),
        &device,
    )
    .unwrap();
    let local = HostTensor::from_tensor(net.logits(
        r.x_t.to_tensor::<2>(&device),
        HostTensor::new(vec![8], r.t.clone()).to_tensor::<1>(&device),
        &ddm_core::condition::Condition::none(),
    ));
    assert!(max_diff(&served.data, &local.data) <= 1e-6);
    let (status, _) = post(
        &client(),
        &format!("{}/v1/experts/0/velocity", router_server.url),
        None,
        r.to_bytes().unwrap(),
    );
    assert_eq!(status, 404, "a router-only server serves no expert");
    drop(router_server);

    // The server dies mid-sampling: with --allow-missing the sample finishes without it, and the
    // report says from which step.
    let steps = 4000;
    let rows_served = |url: &str| -> f64 {
        let m = client()
            .get(format!("{url}/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        m.lines()
            .find(|l| l.starts_with("ddm_rows_total{model=\"expert 1\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = rows_served(&server.url);
    let sampler = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args([
            "sample",
            "--registry",
            "mixed",
            "--strategy",
            "full",
            "--n",
            "256",
            "--quiet",
        ])
        .args([
            "--steps",
            &steps.to_string(),
            "--allow-missing",
            "--out",
            "survived.png",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        // Two steps computed by the server: the sampler received the first answer.
        if rows_served(&server.url) >= before + 2.0 * 256.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "sampling never reached the server"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let url = server.url.clone();
    drop(server); // SIGKILL
    let out = sampler.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rep = report(d, "survived");
    let lost = &rep["experts_lost"][0];
    assert_eq!(lost["expert"], 1);
    assert_eq!(lost["location"], url.as_str());
    let from = lost["from_step"].as_u64().unwrap();
    assert!(from > 0 && from < steps, "lost from step {from}");
    assert!(samples(d, "survived").iter().all(|v| v.is_finite()));
    // Expert 1 ran on every row before `from`, expert 0 alone after.
    let used: u64 = rep["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rows_per_expert"][1].as_u64().unwrap())
        .sum();
    assert_eq!(used, from * 256);

    // Without --allow-missing, a server that stays down is an error naming it.
    let e = fails(sample("mixed", "failed.png", &[]));
    assert!(e.contains(&format!("expert 1, served at {url}")), "{e}");
    let e = fails(ddm(d, &["registry", "--registry", "mixed", "verify"]));
    assert!(e.contains(&url), "{e}");
}

/// Class-conditional experts served: classifier-free guidance is applied by the client as for a
/// local expert, and the null class stands in when no class is asked for.
#[test]
fn served_conditional_experts_guide_like_local_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture_with(d, 2, 2);
    let (e0, e1) = (experts[0].to_str().unwrap(), experts[1].to_str().unwrap());
    ok(ddm(
        d,
        &["register", "--registry", "local", "--partition", "p", e0, e1],
    ));
    ok(ddm(
        d,
        &["register", "--registry", "island-1", "--partition", "p", e1],
    ));
    let server = Server::start(d, &["--registry", "island-1"], None);
    ok(ddm(
        d,
        &["register", "--registry", "mixed", "--partition", "p", e0],
    ));
    ok(ddm(
        d,
        &["register", "--registry", "mixed", "--remote", &server.url],
    ));
    for (stem, extra) in [
        ("guided", vec!["--class", "all", "--guidance", "2"]),
        ("class1", vec!["--class", "1"]),
        ("unconditional", vec![]),
    ] {
        for reg in ["local", "mixed"] {
            let out = format!("{reg}-{stem}.png");
            let mut args = vec![
                "sample",
                "--registry",
                reg,
                "--strategy",
                "oracle:1",
                "--n",
                "16",
                "--steps",
                "6",
                "--quiet",
                "--out",
                &out,
            ];
            args.extend(&extra);
            ok(ddm(d, &args));
        }
        let diff = max_diff(
            &samples(d, &format!("local-{stem}")),
            &samples(d, &format!("mixed-{stem}")),
        );
        println!("{stem}: served vs local max |diff| = {diff:e}");
        assert!(diff <= 1e-6, "{stem}: served and local samples differ by {diff}");
    }
    let e = fails(ddm(
        d,
        &[
            "sample",
            "--registry",
            "mixed",
            "--strategy",
            "oracle:1",
            "--class",
            "5",
            "--quiet",
        ],
    ));
    assert!(e.contains("out of range"), "{e}");
}

/// What the https test server saw: the Range header of each request (None: no range).
type Seen = Arc<Mutex<Vec<Option<u64>>>>;

/// A loopback https server for one file: it cuts its first answer off halfway, and honours
/// `Range: bytes=N-` with 206.
fn https_server(body: Vec<u8>, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> (std::net::SocketAddr, Seen) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut answered = 0;
        for tcp in listener.incoming() {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp.unwrap());
            let mut head = vec![];
            let mut byte = [0u8; 1];
            // A client that rejects the certificate ends the handshake here.
            while !head.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if !head.ends_with(b"\r\n\r\n") {
                continue;
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let from: Option<u64> = head
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes="))
                .and_then(|r| r.trim().trim_end_matches('-').parse().ok());
            seen2.lock().unwrap().push(from);
            let n = body.len();
            let _ = match from {
                Some(f) => tls.write_all(
                    &[
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {f}-{}/{n}\r\nConnection: close\r\n\r\n",
                            n - f as usize,
                            n - 1
                        )
                        .into_bytes(),
                        body[f as usize..].to_vec(),
                    ]
                    .concat(),
                ),
                None => {
                    let cut = if answered == 0 { n / 2 } else { n };
                    tls.write_all(
                        &[
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").into_bytes(),
                            body[..cut].to_vec(),
                        ]
                        .concat(),
                    )
                }
            };
            let _ = tls.flush();
            if from.is_some() || answered > 0 {
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
            answered += 1;
            // Dropping the stream closes the connection (without close_notify on a cut answer).
        }
    });
    (addr, seen)
}

#[test]
fn https_download_trusts_the_given_root_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    let body = std::fs::read(&experts[1]).unwrap();
    let sha = ddm_core::digest::sha256_hex(&body);
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    std::fs::write(d.join("server.pem"), cert.cert.pem()).unwrap();
    let (addr, seen) = https_server(body.clone(), &cert);
    let url = format!(
        "https://127.0.0.1:{}/expert-1.safetensors#sha256={sha}",
        addr.port()
    );
    let register = |ca: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ddm"));
        c.args(["register", "--registry", "reg", "--partition", "p", &url])
            .env("DDM_CACHE", d.join("cache"))
            .current_dir(d);
        match ca {
            Some(ca) => c.env("DDM_CA_CERT", ca),
            None => c.env_remove("DDM_CA_CERT"),
        };
        c.output().unwrap()
    };
    // Not trusted without the root.
    let e = fails(register(None));
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    // Trusted with it; the first answer is cut off halfway: an error, the partial file kept.
    let e = fails(register(Some("server.pem")));
    assert!(e.contains("downloading"), "{e}");
    // The next run resumes from where it stopped, and the result is verified.
    let out = ok(register(Some("server.pem")));
    assert!(out.contains("registered expert 1"), "{out}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], None);
    let resumed_at = seen[1].expect("the second request asked for a range");
    assert!(
        resumed_at > 0 && resumed_at <= (body.len() / 2) as u64,
        "{seen:?}"
    );
    assert!(ok(ddm(d, &["registry", "--registry", "reg", "list"])).contains(&sha[..12]));
}

/// `ddm serve --max-memory`: four experts served under a cap that holds two answer exactly what
/// each computes locally, loading and unloading them as requests come; a model larger than the cap
/// is refused at start.
#[test]
fn a_memory_cap_serves_more_experts_than_fit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 4);
    let mut args = vec!["register", "--registry", "reg", "--partition", "p"];
    args.extend(experts.iter().map(|e| e.to_str().unwrap()));
    ok(ddm(d, &args));
    let mib = std::fs::metadata(&experts[0]).unwrap().len() as f64 / (1 << 20) as f64;
    let e = fails(ddm(
        d,
        &[
            "serve",
            "--registry",
            "reg",
            "--listen",
            "127.0.0.1:0",
            "--max-memory",
            &format!("{}", mib / 2.0),
        ],
    ));
    assert!(e.contains("more than --max-memory"), "{e}");
    let server = Server::start(
        d,
        &["--registry", "reg", "--max-memory", &format!("{}", mib * 2.5)],
        None,
    );
    let http = client();
    // 8 clients, each asking every expert in turn.
    let answers: Vec<(usize, Request, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|c| {
                let (http, base) = (&http, &server.url);
                s.spawn(move || {
                    (0..8u64)
                        .map(|i| {
                            let k = ((c + i) % 4) as usize;
                            let r = request(5, c * 8 + i);
                            let (status, body) = post(
                                http,
                                &format!("{base}/v1/experts/{k}/velocity"),
                                None,
                                r.to_bytes().unwrap(),
                            );
                            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                            (k, r, velocity_of(&body).data)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for (k, r, v) in &answers {
        assert!(
            max_diff(v, &local_velocity(&experts[*k], r)) <= 1e-6,
            "expert {k}"
        );
    }
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let value = |prefix: &str| metric(&metrics, prefix);
    let loads = value("ddm_model_loads_total");
    println!("{loads} model loads for 64 requests to 4 experts under a cap of 2");
    assert!(loads > 4.0, "{metrics}");
    assert!(value("ddm_models_held") <= 2.0, "{metrics}");
}
