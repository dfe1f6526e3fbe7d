//! sha256 digests, hex-encoded: how every ddm file (checkpoint data, shard, registry blob,
//! download) is fingerprinted and verified. One home, so every crate hashes the same way.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a byte slice, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file, hex, streamed in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// sha256 of data that arrives in pieces (a download), hex when finished.
#[derive(Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

/// The field a sealed JSON object ends with.
const SEAL: &str = ",\"sha256_of_the_rest\":\"";

/// Seal a JSON object: append a last field holding `sha256` (of whatever the caller covers,
/// typically this very JSON). The text before the field is kept byte for byte, so [`unseal_json`]
/// recovers exactly what was hashed, without re-serialising (which need not give the same bytes).
pub fn seal_json(json: &str, sha256: &str) -> String {
    let body = json.strip_suffix('}').expect("a JSON object");
    let sep = if body.trim_end().ends_with('{') {
        &SEAL[1..]
    } else {
        SEAL
    };
    format!("{body}{sep}{sha256}\"}}")
}

/// The JSON as it was before [`seal_json`] and the sha256 it was sealed with, or None when the
/// object carries no seal (written before ddm sealed it).
pub fn unseal_json(sealed: &str) -> Option<(String, String)> {
    let tail = 64 + 2; // the hex digest, the closing quote and brace
    let n = sealed.len();
    if n < tail || !sealed.is_char_boundary(n - tail) {
        return None;
    }
    let (head, sha) = (&sealed[..n - tail], &sealed[n - tail..n - 2]);
    if !sealed.ends_with("\"}") || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let body = head.strip_suffix(SEAL).or_else(|| {
        head.strip_suffix(&SEAL[1..])
            .filter(|b| b.trim_end().ends_with('{'))
    })?;
    Some((format!("{body}}}"), sha.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sealed_json_unseals_to_the_same_bytes() {
        for json in [r#"{"a":1,"b":[0.000014898180961608886]}"#, "{}"] {
            let sha = super::sha256_hex(json.as_bytes());
            let sealed = super::seal_json(json, &sha);
            let v: serde_json::Value = serde_json::from_str(&sealed).unwrap();
            assert_eq!(v["sha256_of_the_rest"], sha.as_str());
            assert_eq!(super::unseal_json(&sealed), Some((json.to_string(), sha)));
        }
        assert_eq!(super::unseal_json(r#"{"a":1}"#), None);
    }

    #[test]
    fn known_digest_and_file_agree() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(super::sha256_hex(b"abc"), abc);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(super::sha256_file(&p).unwrap(), abc);
        assert!(super::sha256_file(&dir.path().join("missing")).is_err());
    }
}
