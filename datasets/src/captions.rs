//! Captions from a file, one per sample in order: a `captions.jsonl` (one JSON object a line, its
//! `caption` or `text` field, as LAION and webdataset exports write them) or plain text (one
//! caption a line); or the captions an image folder keeps beside its images ([`of_images`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
            true => caption_of(&parse_line(line).map_err(at)?).map_err(at)?,
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

/// The file a folder's `captions.jsonl` gives captions by name.
pub const FOLDER_CAPTIONS: &str = "captions.jsonl";

/// The captions of `images` (files under `dir`, in order), if the folder has them:
/// `dir/captions.jsonl`, whose lines name their image (`file`, relative to `dir`) beside the
/// caption, or a `NAME.txt` beside every image `NAME.png`. None when it has neither; an error
/// naming the first image without a caption when only some have one.
pub fn of_images(dir: &Path, images: &[PathBuf]) -> Result<Option<Vec<String>>> {
    let listed = dir.join(FOLDER_CAPTIONS);
    if listed.is_file() {
        let by_file = read_named(&listed)?;
        return images
            .iter()
            .map(|p| {
                let rel = p.strip_prefix(dir).unwrap_or(p);
                by_file
                    .get(rel)
                    .cloned()
                    .ok_or_else(|| Error::bad(&listed, format!("no caption for the image {}", rel.display())))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some);
    }
    let beside: Vec<PathBuf> = images.iter().map(|p| p.with_extension("txt")).collect();
    let present = beside.iter().filter(|t| t.is_file()).count();
    if present == 0 {
        return Ok(None);
    }
    beside
        .iter()
        .zip(images)
        .map(|(txt, image)| match txt.is_file() {
            true => {
                let text = std::fs::read_to_string(txt).map_err(|e| Error::io(txt, e))?;
                if text.len() > MAX_CAPTION_BYTES {
                    return Err(Error::bad(
                        txt,
                        format!("{} bytes, more than a caption's {MAX_CAPTION_BYTES}", text.len()),
                    ));
                }
                Ok(text.trim_end().to_string())
            }
            false => Err(Error::bad(
                image,
                format!(
                    "no caption beside it ({} of the folder's images have a .txt caption)",
                    present
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A folder's `captions.jsonl`: each line's `file` and caption.
fn read_named(path: &Path) -> Result<HashMap<PathBuf, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut by_file = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |reason: String| Error::bad(path, format!("line {}: {reason}", i + 1));
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_CAPTION_BYTES {
            return Err(at(format!(
                "{} bytes, more than a caption's {MAX_CAPTION_BYTES}",
                line.len()
            )));
        }
        let value = parse_line(line).map_err(at)?;
        let caption = caption_of(&value).map_err(at)?;
        let Some(file) = value.get("file").and_then(|f| f.as_str()) else {
            return Err(at("no `file`: a folder's captions name their image".into()));
        };
        if by_file.insert(PathBuf::from(file), caption).is_some() {
            return Err(at(format!("a second caption for {file}")));
        }
    }
    Ok(by_file)
}

/// The caption of one JSON line.
/// One JSON line.
fn parse_line(line: &str) -> std::result::Result<serde_json::Value, String> {
    serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))
}

/// The caption of one JSON line's object: its `caption` (or `text`) string.
fn caption_of(value: &serde_json::Value) -> std::result::Result<String, String> {
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

    /// A folder's captions: from `captions.jsonl` by file name (in the images' order, whatever the
    /// lines' order), or from a `.txt` beside each image; none when it has neither; the image
    /// without one named.
    #[test]
    fn folder_captions_follow_their_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let images: Vec<PathBuf> = ["a/1.png", "a/2.png", "b/3.jpg"]
            .iter()
            .map(|p| d.join(p))
            .collect();
        assert_eq!(of_images(d, &images).unwrap(), None);
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::create_dir_all(d.join("b")).unwrap();
        std::fs::write(d.join("a/1.txt"), "one\n").unwrap();
        std::fs::write(d.join("b/3.txt"), "three").unwrap();
        let err = of_images(d, &images).unwrap_err().to_string();
        assert!(
            err.contains("a/2.png") && err.contains("2 of the folder's images"),
            "{err}"
        );
        std::fs::write(d.join("a/2.txt"), "two  \n\n").unwrap();
        assert_eq!(
            of_images(d, &images).unwrap().unwrap(),
            vec!["one", "two", "three"]
        );

        std::fs::write(
            d.join(FOLDER_CAPTIONS),
            "{\"file\": \"b/3.jpg\", \"caption\": \"C\"}\n{\"file\": \"a/1.png\", \"text\": \"A\"}\n",
        )
        .unwrap();
        let err = of_images(d, &images).unwrap_err().to_string();
        assert!(
            err.contains("captions.jsonl: no caption for the image a/2.png"),
            "{err}"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(FOLDER_CAPTIONS))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"file\": \"a/2.png\", \"caption\": \"B\"}\n").unwrap();
        assert_eq!(of_images(d, &images).unwrap().unwrap(), vec!["A", "B", "C"]);
        std::io::Write::write_all(&mut f, b"{\"file\": \"a/2.png\", \"caption\": \"again\"}\n").unwrap();
        let err = of_images(d, &images).unwrap_err().to_string();
        assert!(err.contains("line 4: a second caption for a/2.png"), "{err}");
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
