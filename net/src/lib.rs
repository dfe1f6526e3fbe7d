//! ddm-net: HTTP(S) for every network use of ddm (data downloads, registration by URL, served experts):
//! one client configuration, and downloads that stream to disk, resume and verify.
//!
//! TLS is rustls with the `ring` provider; certificates are checked against the system's roots
//! plus any PEM file named by `DDM_CA_CERT` (a private CA, or a server's self-signed certificate).
//! Timeouts bound connecting and each read, never a whole transfer, so a large checkpoint on a slow
//! link is not cut off while it still moves.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use sha2::{Digest, Sha256};

use ddm_core::env::CA_CERT as CA_CERT_ENV;
use ddm_core::error::chain;
use ddm_core::error::{Error, Result};
use ddm_core::progress::Progress;

/// How long to wait for a connection, and for each read of a transfer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// rustls with ring, for every client in the process (reqwest is built without a provider).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The client every ddm network use starts from: rustls (system roots + `DDM_CA_CERT`), a
/// connect timeout and a per-read timeout.
pub fn client_builder() -> Result<reqwest::blocking::ClientBuilder> {
    install_crypto_provider();
    let mut b = reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        // In reqwest's blocking client this bounds the wait for the answer's headers and then
        // each read of the body, not the whole transfer.
        .timeout(READ_TIMEOUT)
        .user_agent(concat!("ddm/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ddm_core::env::ca_cert() {
        let pem = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::Invalid(format!(
                "{} ({CA_CERT_ENV}): not PEM certificates: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(Error::Invalid(format!(
                "{} ({CA_CERT_ENV}): holds no certificate",
                path.display()
            )));
        }
        b = b.tls_certs_merge(certs);
    }
    Ok(b)
}

/// A client from [`client_builder`].
pub fn client() -> Result<reqwest::blocking::Client> {
    client_builder()?
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start an HTTP client: {e}")))
}

/// Download `url` to `dest`: streamed to `dest` + `.part`, resumed from a `.part` left by an
/// interrupted run when the server honours ranges (restarted when it does not), checked against
/// `sha256` when given, and renamed into place only when complete and verified. Returns the
/// file's sha256. Bytes are reported to `progress`.
pub fn download(
    client: &reqwest::blocking::Client,
    url: &str,
    dest: &Path,
    sha256: Option<&str>,
    progress: &dyn Progress,
) -> Result<String> {
    let fail = |what: String| Error::Invalid(format!("downloading {url}: {what}"));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().map_err(|e| fail(chain(&e)))?;
    let status = resp.status();
    let resumed = have > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !(status.is_success() || status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0) {
        return Err(fail(format!("HTTP {status}")));
    }
    // Hash what is already there when resuming; start over otherwise.
    let mut hasher = Sha256::new();
    let mut file = if resumed {
        let mut f = std::fs::File::open(&part).map_err(|e| Error::io(&part, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(&part, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        tracing::info!("{url}: resuming after {have} bytes");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .map_err(|e| Error::io(&part, e))?
    } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        // The partial file is already whole (or longer than the resource): start over.
        std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
        return download(client, url, dest, sha256, progress);
    } else {
        std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?
    };
    let done_before = if resumed { have } else { 0 };
    progress.begin(
        &format!(
            "download {}",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("")
        ),
        resp.content_length().map_or(0, |l| l + done_before),
    );
    progress.advance(done_before);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = resp.read(&mut buf).map_err(|e| fail(chain(&e)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
        progress.advance(n as u64);
    }
    file.sync_all().map_err(|e| Error::io(&part, e))?;
    drop(file);
    progress.finish();
    let got = ddm_core::digest::hex(&hasher.finalize());
    if let Some(want) = sha256
        && !want.eq_ignore_ascii_case(&got)
    {
        std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
        return Err(fail(format!(
            "sha256 {got} does not match the expected {want}; the download was discarded"
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))?;
    Ok(got)
}
