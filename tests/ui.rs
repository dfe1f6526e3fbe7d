//! `ddm ui`: its token and refusals over plain HTTP, and the page in a real browser (headless
//! Chromium driven through chromedriver by fantoccini): a quickstart's registry with its K experts
//! and router curve, a grid drawn from the page equal to `ddm sample`'s, an island's progress
//! moving while it trains. Screenshots go to `target/tmp/ui/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Server, ddm, ok};
use fantoccini::{Client, Locator};

/// An address of this machine that is not loopback (the route a UDP socket would take; nothing is
/// sent), if it has one.
fn own_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.1:9").ok()?;
    Some(s.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[test]
fn off_loopback_the_page_needs_the_token_and_bad_requests_get_a_4xx() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("runs")).unwrap();
    // No token on a public address: refused before listening.
    let out = ddm(dir.path(), &["ui", "--runs", "runs", "--listen", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a loopback address"),
        "{err}"
    );

    let ui = Server::start_verb(
        dir.path(),
        "ui",
        &["--runs", "runs", "--listen", "0.0.0.0:0"],
        Some("s3cret"),
    );
    let port = ui.url.rsplit(':').next().unwrap();
    let host = own_address().map_or("127.0.0.1".to_string(), |ip| ip.to_string());
    let base = format!("http://{host}:{port}");
    let http = ddm_net::client_builder()
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("{base}{path}"));
    for path in ["/", "/api/overview", "/api/islands", "/app.js"] {
        let r = get(path).send().unwrap();
        assert_eq!(r.status(), 401, "{path} without the token");
        assert!(
            r.text().unwrap().contains("?token="),
            "the refusal says how to get in"
        );
    }
    assert_eq!(
        get("/api/overview").bearer_auth("wrong").send().unwrap().status(),
        401
    );
    assert_eq!(
        get("/api/overview")
            .bearer_auth("s3cret")
            .send()
            .unwrap()
            .status(),
        200
    );
    // The token in the address once: a cookie with its hash, and the address without it.
    let r = get("/?token=s3cret").send().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        !cookie.contains("s3cret") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let page = get("/").header("cookie", &pair).send().unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().unwrap().contains("<title>ddm ui</title>"));
    assert_eq!(
        get("/")
            .header("cookie", "ddm_ui_token=00")
            .send()
            .unwrap()
            .status(),
        401
    );
    // Bad requests, with the token: 4xx with a reason, and the server keeps serving.
    let authed = |r: reqwest::blocking::RequestBuilder| r.bearer_auth("s3cret").send().unwrap();
    for (path, status) in [
        ("/api/islands/nope/loss.svg", 404),
        ("/api/islands/..%2F..%2Fetc/samples.png", 404),
        ("/api/registry", 404),
        ("/api/partition", 404),
        ("/no/such/page", 404),
    ] {
        let r = authed(get(path));
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
    let post = |body: &str| authed(http.post(format!("{base}/api/sample")).body(body.to_string()));
    assert_eq!(post("{not json").status(), 400);
    assert_eq!(
        post(r#"{"n": 4, "colour": "red"}"#).status(),
        400,
        "unknown fields are refused"
    );
    assert_eq!(post(r#"{"n": 4}"#).status(), 404, "no registry to sample");
    let big = "x".repeat(100 << 10);
    assert_eq!(post(&big).status(), 413);
    assert_eq!(authed(get("/api/overview")).status(), 200, "still serving");
}

/// chromedriver on a free port, killed when dropped.
struct Driver(Child, u16);

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver runs (Debian: apt install chromium chromium-driver; .ci/run installs them)",
            );
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"],
        }),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a headless Chromium session")
}

/// Poll `f` every 200 ms until it returns Some, for at most `secs` seconds.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.unwrap()
}

/// An island's step as the page shows it.
async fn shown_step(c: &Client, island: &str) -> Option<u64> {
    let script = format!(
        "const s = document.querySelector('.card[data-name=\"{island}\"] .step'); return s ? Number(s.dataset.step) : null;"
    );
    js(c, &script).await.as_u64()
}

async fn text_of(c: &Client, id: &str) -> String {
    c.find(Locator::Id(id)).await.unwrap().text().await.unwrap()
}

async fn set_input(c: &Client, id: &str, value: &str) {
    let e = c.find(Locator::Id(id)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

fn screenshots() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A PNG's size and RGBA-or-RGB bytes.
fn pixels(bytes: &[u8]) -> (u32, u32, png::ColorType, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

#[test]
#[ignore = "needs chromium and chromedriver (Debian: chromium chromium-driver); CI installs them"]
fn the_page_shows_the_run_live_and_samples_what_ddm_sample_draws() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    #[rustfmt::skip]
    ok(ddm(d, &[
        "quickstart", "--k", "3", "--expert-model", "DiT-XS/4", "--expert-steps", "10",
        "--router-model", "DiT-XS/4", "--router-steps", "5", "--n", "15", "--steps", "2",
        "--fd-samples", "0", "--out", "q",
    ]));
    // An island that trains while the page watches it.
    #[rustfmt::skip]
    let mut trainer = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(["train", "--partition", "q/partition", "--cluster", "0", "--out", "q/live",
            "--model", "DiT-XS/4", "--steps", "1000000", "--batch-size", "8", "--log-every", "2", "--quiet"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ui = Server::start_verb(d, "ui", &["--runs", "q", "--listen", "127.0.0.1:0"], None);
    let driver = Driver::start();
    let shots = screenshots();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let from_page = rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&ui.url).await.unwrap();
        // The registry's K experts and its router; the partition's clusters; the router curve.
        let experts = until("the registry's experts", 60, || async {
            let n = c.find_all(Locator::Css("#registry tr.expert")).await.ok()?.len();
            (n == 3).then_some(n)
        })
        .await;
        assert_eq!(experts, 3);
        assert_eq!(c.find_all(Locator::Css("#registry tr.router")).await.unwrap().len(), 1);
        let registry = text_of(&c, "registry").await;
        assert!(registry.contains("class (10)") && registry.contains("dit"), "{registry}");
        until("the partition's clusters", 30, || async {
            (c.find_all(Locator::Css("#clusters tr.cluster")).await.ok()?.len() == 3).then_some(())
        })
        .await;
        until("the router curve", 30, || async {
            js(&c, "const i = document.getElementById('router-curve'); return i.complete && !i.hidden ? i.naturalWidth : 0;")
                .await
                .as_u64()
                .filter(|&w| w > 0)
        })
        .await;
        // The training island's step moves on the page.
        let first = until("the live island's first step", 120, || async {
            shown_step(&c, "live").await.filter(|&s| s > 0)
        })
        .await;
        let later = until("the live island's step to move", 120, || async {
            shown_step(&c, "live").await.filter(|&s| s > first)
        })
        .await;
        assert!(later > first);
        let state = c.find(Locator::Css(".card[data-name=\"live\"] .state")).await.unwrap();
        assert_eq!(state.text().await.unwrap(), "running");
        let done = c.find(Locator::Css(".card[data-name=\"expert-0\"] .state")).await.unwrap();
        assert_eq!(done.text().await.unwrap(), "done");
        let router = c.find(Locator::Css(".card[data-name=\"router\"] .state")).await.unwrap();
        assert_eq!(router.text().await.unwrap(), "done", "the router logged nothing in 5 steps");
        std::fs::write(shots.join("islands.png"), c.screenshot().await.unwrap()).unwrap();

        // Sampling by hand.
        c.find(Locator::Id("class")).await.unwrap().select_by_value("3").await.unwrap();
        c.find(Locator::Id("precision")).await.unwrap().select_by_value("bf16").await.unwrap();
        for (id, v) in [("strategy", "top-1"), ("steps", "3"), ("n", "6"), ("seed", "5"), ("guidance", "2")] {
            set_input(&c, id, v).await;
        }
        c.find(Locator::Id("draw")).await.unwrap().click().await.unwrap();
        let status = until("the sample", 180, || async {
            let t = text_of(&c, "sample-status").await;
            (t.starts_with("drawn") || c.find(Locator::Css("#sample-status.bad")).await.is_ok()).then_some(t)
        })
        .await;
        assert!(status.starts_with("drawn: 6 samples, 3 unipc steps, strategy top-1"), "{status}");
        // Top-1 runs one expert per sample at each of UniPC's 3 evaluations.
        assert!(status.contains(" s and 3.0 expert evaluations per image"), "{status}");
        let usage = c.find_all(Locator::Css("#usage-table tr")).await.unwrap().len();
        assert!(usage >= 2, "a row per step range under the header");
        let src = c.find(Locator::Id("sample-grid")).await.unwrap().attr("src").await.unwrap().unwrap();
        c.find(Locator::Id("verify")).await.unwrap().click().await.unwrap();
        until("verify", 60, || async {
            (text_of(&c, "verify-result").await == "every checkpoint verified").then_some(())
        })
        .await;
        c.execute("document.getElementById('sample-panel').scrollIntoView()", vec![]).await.unwrap();
        std::fs::write(shots.join("sample.png"), c.screenshot().await.unwrap()).unwrap();

        // Stopped, the island is interrupted (its state saved to resume from).
        unsafe { libc::kill(trainer.id() as i32, libc::SIGTERM) };
        assert_eq!(trainer.wait().unwrap().code(), Some(3), "an interrupted trainer exits 3");
        until("the island to show interrupted", 30, || async {
            let e = c.find(Locator::Css(".card[data-name=\"live\"] .state")).await.ok()?;
            (e.text().await.ok()? == "interrupted").then_some(())
        })
        .await;
        c.close().await.unwrap();
        src
    });
    let png_b64 = from_page
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    let page_png = base64::engine::general_purpose::STANDARD.decode(png_b64).unwrap();
    #[rustfmt::skip]
    ok(ddm(d, &["sample", "--registry", "q/registry", "--class", "3", "--strategy", "top-1",
        "--steps", "3", "--n", "6", "--seed", "5", "--guidance", "2", "--precision", "bf16",
        "--out", "cli.png", "--quiet"]));
    let cli = pixels(&std::fs::read(d.join("cli.png")).unwrap());
    let page = pixels(&page_png);
    assert_eq!(
        (page.0, page.1, page.2),
        (cli.0, cli.1, cli.2),
        "the same grid size and colour type"
    );
    assert!(page.3 == cli.3, "the page's grid has the pixels of ddm sample's");
    println!("screenshots in {}", shots.display());
}
