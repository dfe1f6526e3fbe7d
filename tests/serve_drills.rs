//! Drills against `ddm serve` on loopback: slow and half-open clients are shed while real requests
//! are answered; a body declared over the limit is refused before it is sent; connections over
//! the cap get 503; SIGTERM with half-open connections exits within its deadline; an expert server
//! that answers NaN fails the sampling, naming it, or (with --allow-missing) is left out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ddm_core::host::{HostTensor, TensorFile};
use ddm_ensemble::remote::Request;

mod common;
use common::{Server, ddm, fails, ok, registry_fixture};

fn request(rows: usize) -> Request {
    Request {
        x_t: HostTensor::new(
            vec![rows, 2],
            (0..rows * 2).map(|i| (i % 7) as f32 - 3.0).collect(),
        ),
        t: (0..rows).map(|i| (i % 9) as f32 / 10.0 + 0.05).collect(),
        y: None,
        c: None,
        tokens: None,
    }
}

/// A registry `reg` of K = 1 expert in `d`.
fn one_expert(d: &Path) {
    let experts = registry_fixture(d, 1);
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ],
    ));
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// A real request on a fresh connection: its status, the time it took, and its velocity.
fn velocity(url: &str, token: Option<&str>) -> (u16, Duration, Option<HostTensor>) {
    let http = ddm_net::client().unwrap();
    let start = Instant::now();
    let mut r = http
        .post(format!("{url}/v1/experts/0/velocity"))
        .body(request(16).to_bytes().unwrap());
    if let Some(t) = token {
        r = r.header("authorization", format!("bearer {t}"));
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().unwrap().to_vec();
    let took = start.elapsed();
    let v = (status == 200).then(|| {
        TensorFile::from_bytes(Path::new("answer"), body)
            .unwrap()
            .f32("v")
            .unwrap()
    });
    (status, took, v)
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

/// What a raw connection receives until the server closes it (or `wait` passes: then None).
fn until_closed(mut s: TcpStream, wait: Duration) -> Option<String> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = vec![];
    match s.read_to_end(&mut got) {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&got).into_owned())
        }
        Err(_) => None,
    }
}

/// Connections that never finish a request: idle, half a head, a head (with the token the drills'
/// servers take, if any) and part of the body.
fn slow_clients(addr: &str, each: usize) -> Vec<(&'static str, TcpStream)> {
    let mut out = vec![];
    for _ in 0..each {
        out.push(("idle", TcpStream::connect(addr).unwrap()));
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"POST /v1/experts/0/velocity HTTP/1.1\r\nHost: x\r\nContent-Le")
            .unwrap();
        out.push(("half a head", half));
        let mut body = TcpStream::connect(addr).unwrap();
        body.write_all(
            b"POST /v1/experts/0/velocity HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .unwrap();
        out.push(("part of a body", body));
    }
    out
}

#[test]
fn slow_and_half_open_clients_are_shed_while_real_requests_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    one_expert(d);
    let server = Server::start(
        d,
        &[
            "--registry",
            "reg",
            "--header-timeout-s",
            "1",
            "--body-timeout-s",
            "1",
            "--max-connections",
            "32",
        ],
        Some("s3cret"),
    );
    let addr = host_port(&server.url);
    let (status, _, reference) = velocity(&server.url, Some("s3cret"));
    assert_eq!(status, 200, "the bearer scheme is case-insensitive");
    let reference = reference.unwrap();
    let before: Vec<Duration> = (0..20).map(|_| velocity(&server.url, Some("s3cret")).1).collect();

    // 24 slow clients hold connections; real requests on fresh connections are still answered.
    let slow = slow_clients(&addr, 8);
    let during: Vec<Duration> = (0..20)
        .map(|_| {
            let (status, took, v) = velocity(&server.url, Some("s3cret"));
            assert_eq!(status, 200);
            assert_eq!(v.unwrap(), reference);
            took
        })
        .collect();
    println!(
        "real requests, median latency: {:?} alone, {:?} beside 24 slow clients",
        median(before),
        median(during)
    );
    // The server closes every slow connection (a body that stops arriving gets 408 first).
    for (what, s) in slow {
        let got = until_closed(s, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("a client sending {what} was not disconnected"));
        if what == "part of a body" {
            assert!(got.starts_with("HTTP/1.1 408"), "{what}: {got}");
        }
    }

    // A body declared over the limit is refused before it is sent.
    let mut big = TcpStream::connect(&addr).unwrap();
    big.write_all(
        b"POST /v1/experts/0/velocity HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000000000000\r\n\r\n",
    )
    .unwrap();
    let got = until_closed(big, Duration::from_secs(30)).expect("answered without the body");
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");

    // Over the cap, a connection is answered 503 and closed; once the idle ones are shed, the
    // server answers again.
    let held: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let answers: Vec<String> = held
        .into_iter()
        .map(|s| until_closed(s, Duration::from_secs(30)).expect("shed"))
        .collect();
    let refused = answers.iter().filter(|a| a.starts_with("HTTP/1.1 503")).count();
    assert!(
        refused >= 8,
        "{refused} of 40 connections over a cap of 32 were refused"
    );
    let (status, _, _) = velocity(&server.url, Some("s3cret"));
    assert_eq!(status, 200);
    let metrics = ddm_net::client()
        .unwrap()
        .get(format!("{}/metrics", server.url))
        .bearer_auth("s3cret")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("ddm_connections_refused_total"), "{metrics}");
}

#[test]
fn sigterm_with_half_open_connections_exits_within_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    one_expert(d);
    let mut server = Server::start(
        d,
        &[
            "--registry",
            "reg",
            "--header-timeout-s",
            "600",
            "--body-timeout-s",
            "600",
            "--shutdown-timeout-s",
            "2",
        ],
        None,
    );
    let addr = host_port(&server.url);
    let slow = slow_clients(&addr, 4);
    assert_eq!(velocity(&server.url, None).0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ddm serve did not exit after SIGTERM with {} half-open connections",
            slow.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("exited {:?} after SIGTERM (deadline 2 s)", start.elapsed());
    assert!(status.success(), "{status}");
}

/// A server that answers every velocity request with NaN (a broken or hostile island), on its own
/// thread; its URL.
fn nan_server(rows_shape: Vec<usize>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = vec![];
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                buf.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&buf).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).is_err() {
                continue;
            }
            let answer = match Request::from_bytes(body, &rows_shape) {
                Ok(r) => {
                    let v = HostTensor::new(r.x_t.shape.clone(), vec![f32::NAN; r.x_t.data.len()]);
                    ddm_ensemble::remote::response_bytes("v", &v).unwrap()
                }
                Err(_) => continue,
            };
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    answer.len()
                )
                .as_bytes(),
            );
            let _ = s.write_all(&answer);
        }
    });
    url
}

#[test]
fn an_expert_answering_nan_fails_the_sampling_naming_it_or_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
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
    // Expert 1 is registered by URL from a real server, which a NaN-answering one then replaces.
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "island-1",
            "--partition",
            "p",
            experts[1].to_str().unwrap(),
        ],
    ));
    let server = Server::start(d, &["--registry", "island-1"], None);
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
            "r/router.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &["register", "--registry", "reg", "--remote", &server.url],
    ));
    drop(server);
    let nan = nan_server(vec![2]);
    let index = d.join("reg/registry.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    idx["experts"]["1"]["remote"] = nan.clone().into();
    std::fs::write(&index, serde_json::to_vec_pretty(&idx).unwrap()).unwrap();

    let sample = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "full",
            "--n",
            "8",
            "--steps",
            "3",
            "--out",
            out,
        ];
        args.extend(extra);
        ddm(d, &args)
    };
    let e = fails(sample("failed.png", &[]));
    assert!(
        e.contains(&format!("expert 1, served at {nan}")) && e.contains("NaN"),
        "{e}"
    );
    assert!(
        !d.join("failed.safetensors").exists(),
        "nothing is written from a failed sampling"
    );

    ok(sample("survived.png", &["--allow-missing"]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("survived.json")).unwrap()).unwrap();
    assert_eq!(report["experts_lost"][0]["expert"], 1);
    assert_eq!(report["experts_lost"][0]["from_step"], 0);
    let x0 = TensorFile::read(&d.join("survived.safetensors"))
        .unwrap()
        .f32("x0")
        .unwrap();
    assert!(x0.data.iter().all(|v| v.is_finite()));
}
