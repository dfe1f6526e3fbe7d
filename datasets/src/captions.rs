//! Captions from a file, one per sample in order: a `captions.jsonl` (one JSON object a line, its
//! `caption` or `text` field, as LAION and webdataset exports write them) or plain text (one
//! caption a line).

use std::path::Path;

use crate::error::{Error, Result};

/// The longest caption read, in bytes (a line longer than this is not a caption).
pub const MAX_CAPTION_BYTES: usize = 16 * 1024;

/// The captions of `path`: `.jsonl` files are read as JSON lines, anything else as plain text. A
/// blank line in plain text, a line that is not an object with a string `caption` or `text`, or an
/// empty file is refused, naming the line.
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut captions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |reason: String| Error::bad(path, format!("line {}: {reason}", i + 1));
        if line.len() > MAX_CAPTION_BYTES {
            return Err(at(format!(
                "{} bytes, more than a caption's {MAX_CAPTION_BYTES}",
                line.len()
            )));
        }
        let caption = match jsonl {
            true if line.trim().is_empty() => continue,
            true => caption_of(line).map_err(at)?,
            false if line.trim().is_empty() => {
                return Err(at(
                    "blank: one caption a line (an empty caption is `{\"caption\": \"\"}` in a .jsonl file)"
                        .into(),
                ));
            }
            false => line.trim_end_matches('\r').to_string(),
        };
        captions.push(caption);
    }
    if captions.is_empty() {
        return Err(Error::bad(path, "no captions"));
    }
    Ok(captions)
}

/// The caption of one JSON line.
fn caption_of(line: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let field = ["caption", "text"].into_iter().find_map(|k| value.get(k));
    match field {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("the caption is {other}, not a string")),
        None => Err("an object with a `caption` (or `text`) string expected".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_json_lines_and_plain_text() {
        let (_d, p) = write(
            "c.jsonl",
            "{\"caption\": \"a dark boot\", \"file\": \"0.png\"}\n\n{\"text\": \"\"}\r\n{\"caption\": \"é \\\"q\\\"\"}\n",
        );
        assert_eq!(read_captions(&p).unwrap(), vec!["a dark boot", "", "é \"q\""]);
        let (_d, p) = write("c.txt", "a dark boot\r\nsneakers\n");
        assert_eq!(read_captions(&p).unwrap(), vec!["a dark boot", "sneakers"]);
    }

    #[test]
    fn bad_lines_are_named() {
        for (name, text, want) in [
            (
                "c.jsonl",
                "{\"caption\": \"a\"}\n{\"caption\": 3}\n",
                "line 2: the caption is 3",
            ),
            ("c.jsonl", "{\"caption\": \"a\"}\nnot json\n", "line 2: not JSON"),
            (
                "c.jsonl",
                "{\"file\": \"a.png\"}\n",
                "line 1: an object with a `caption`",
            ),
            ("c.txt", "a\n\nb\n", "line 2: blank"),
            ("c.txt", "", "no captions"),
        ] {
            let (_d, p) = write(name, text);
            let err = read_captions(&p).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(want), "{err}");
        }
    }
}
