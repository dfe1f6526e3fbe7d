//! Everything a user types that reaches a generated job file goes through here: checked for the
//! place it goes, then quoted for it, or refused with an error naming the flag. One layer, so no
//! value reaches a script or manifest by another road.
//!
//! - A shell word (bash for Slurm's scripts, `/bin/sh -c` in a pod): any string without NUL,
//!   single-quoted (`shlex`), so `$()`, backticks, quotes and newlines stay data.
//! - A path: no control characters (a newline would end a `#SBATCH` line or a comment), then
//!   quoted for where it goes.
//! - An `#SBATCH` value: checked against the option's own syntax (a time, a size, names), then
//!   double-quoted as sbatch reads quotes (`\` escapes `"` and `\`); `%` doubled in file names
//!   (sbatch's filename patterns).
//! - A Kubernetes field: names checked as Kubernetes checks them (DNS-1123), quantities as
//!   quantities; every `$` in a container's command doubled, as Kubernetes expands `$(VAR)` there.

use std::path::Path;

use anyhow::{Context, bail};

/// One shell word for bash or POSIX sh: `s` verbatim once the shell has read it.
pub fn shell_word(flag: &str, s: &str) -> anyhow::Result<String> {
    shlex::try_quote(s)
        .map(|c| c.into_owned())
        .map_err(|_| anyhow::anyhow!("{flag}: a NUL character cannot be passed to a program"))
}

/// Shell words for a list of arguments.
pub fn shell_words(flag: &str, words: &[String]) -> anyhow::Result<String> {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| shell_word(flag, w))
        .collect::<anyhow::Result<_>>()?;
    Ok(quoted.join(" "))
}

/// A path or string that is written into a job file outside a quoted word too (comments, sbatch
/// directives): it must hold no control character.
pub fn no_control<'a>(flag: &str, s: &'a str) -> anyhow::Result<&'a str> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => bail!(
            "{flag} {:?}: holds the control character {:?}, which a job file cannot carry",
            s,
            c
        ),
        None => Ok(s),
    }
}

/// A path as text, without control characters.
pub fn path<'a>(flag: &str, p: &'a Path) -> anyhow::Result<&'a str> {
    let s = p
        .to_str()
        .with_context(|| format!("{flag} {}: not valid UTF-8", p.display()))?;
    no_control(flag, s)
}

/// A value inside an `#SBATCH` line, as sbatch's own parser reads it: double-quoted, `\` before
/// `"` and `\`. `s` must already be free of control characters.
pub fn sbatch_quoted(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A path in an `#SBATCH --output` file name: no control characters, `%` doubled (sbatch
/// replaces `%j`, `%a`, ... in file names), then quoted.
pub fn sbatch_file_name(flag: &str, p: &Path) -> anyhow::Result<String> {
    Ok(path(flag, p)?.replace('%', "%%"))
}

/// `--time`: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (sbatch's formats), or
/// UNLIMITED.
pub fn slurm_time(s: &str) -> anyhow::Result<&str> {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let ok = s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("infinite") || {
        let (days, rest) = match s.split_once('-') {
            Some((d, r)) => (Some(d), r),
            None => (None, s),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        days.is_none_or(digits) && (1..=3).contains(&parts.len()) && parts.iter().all(|p| digits(p))
    };
    if !ok {
        bail!(
            "--time {s:?}: not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED)"
        );
    }
    Ok(s)
}

/// `--mem`: a whole number with an optional K, M, G or T.
pub fn slurm_memory(s: &str) -> anyhow::Result<&str> {
    let number = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    let one_unit = s.len() - number.len() <= 1;
    if number.is_empty() || !one_unit || !number.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "--mem {s:?}: not a Slurm memory size (a whole number with an optional K, M, G or T, e.g. 16G)"
        );
    }
    Ok(s)
}

/// Slurm names (`--account`; `--slurm-partition` may list several, comma-separated): letters,
/// digits, `_`, `-` and `.`.
pub fn slurm_names<'a>(flag: &str, s: &'a str, list: bool) -> anyhow::Result<&'a str> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    let ok = match list {
        true => s.split(',').all(name_ok),
        false => name_ok(s),
    };
    if !ok {
        bail!(
            "{flag} {s:?}: a Slurm name holds only letters, digits, `_`, `-` and `.`{}",
            if list { " (several: comma-separated)" } else { "" }
        );
    }
    Ok(s)
}

/// A Kubernetes DNS-1123 label (a Job's name part): lower-case letters, digits and `-`, starting
/// and ending with a letter or digit, at most `max` characters.
pub fn k8s_label<'a>(flag: &str, s: &'a str, max: usize) -> anyhow::Result<&'a str> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if !ok {
        bail!(
            "{flag} {s:?}: not a Kubernetes name (lower-case letters, digits and `-`, starting and ending with a letter or digit, at most {max} characters)"
        );
    }
    Ok(s)
}

/// A Kubernetes DNS-1123 subdomain (a PersistentVolumeClaim's or Secret's name): labels joined by
/// `.`, at most 253 characters.
pub fn k8s_subdomain<'a>(flag: &str, s: &'a str) -> anyhow::Result<&'a str> {
    if s.len() > 253 || s.split('.').any(|l| k8s_label(flag, l, 63).is_err()) {
        bail!(
            "{flag} {s:?}: not a Kubernetes object name (lower-case letters, digits, `-` and `.`, at most 253 characters)"
        );
    }
    Ok(s)
}

/// A container image reference: no whitespace or control characters.
pub fn k8s_image(s: &str) -> anyhow::Result<&str> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("--image {s:?}: an image reference holds no whitespace or control characters");
    }
    Ok(s)
}

/// One `--limits` entry `NAME=QUANTITY`: a Kubernetes resource name (`cpu`, `memory`,
/// `nvidia.com/gpu`) and a quantity (`1`, `500m`, `32Gi`, `1.5`, `2e3`).
pub fn k8s_limit(s: &str) -> anyhow::Result<(&str, &str)> {
    let (name, quantity) = s
        .split_once('=')
        .with_context(|| format!("--limits {s:?}: expected NAME=QUANTITY, e.g. nvidia.com/gpu=1"))?;
    let (prefix, base) = match name.rsplit_once('/') {
        Some((p, b)) => (Some(p), b),
        None => (None, name),
    };
    let base_ok = !base.is_empty()
        && base.len() <= 63
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && base.as_bytes()[0].is_ascii_alphanumeric()
        && base.as_bytes()[base.len() - 1].is_ascii_alphanumeric();
    if !base_ok || prefix.is_some_and(|p| k8s_subdomain("--limits", p).is_err()) {
        bail!(
            "--limits {s:?}: {name:?} is not a Kubernetes resource name (e.g. cpu, memory, nvidia.com/gpu)"
        );
    }
    if !is_quantity(quantity) {
        bail!("--limits {s:?}: {quantity:?} is not a Kubernetes quantity (e.g. 1, 500m, 32Gi, 1.5)");
    }
    Ok((name, quantity))
}

/// Kubernetes' quantity syntax: a decimal number with an optional binary (Ki..Ei), decimal
/// (n, u, m, k, M..E) or exponent (e3, E-2) suffix.
fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    };
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(exponent);
    number_ok && suffix_ok
}

/// A string in a container's `command`: every `$` doubled, so Kubernetes' `$(VAR)` expansion gives
/// back `s` itself.
pub fn k8s_literal(s: &str) -> String {
    s.replace('$', "$$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbatch_values_are_checked_by_their_syntax() {
        for t in [
            "30",
            "12:00:00",
            "1-12",
            "2-00:30",
            "1-02:03:04",
            "UNLIMITED",
            "05:00",
        ] {
            assert_eq!(slurm_time(t).unwrap(), t);
        }
        for t in ["", "1h", "12:00:00\n#SBATCH --x", "1-", "-5", "1:2:3:4", "1 2"] {
            assert!(slurm_time(t).is_err(), "{t:?}");
        }
        for m in ["16G", "500", "0", "2t"] {
            assert_eq!(slurm_memory(m).unwrap(), m);
        }
        for m in ["", "G", "16GB", "1.5G", "16G --x"] {
            assert!(slurm_memory(m).is_err(), "{m:?}");
        }
        assert!(slurm_names("--slurm-partition", "gpu,cpu_q", true).is_ok());
        assert!(slurm_names("--account", "gpu,cpu", false).is_err());
        assert!(slurm_names("--account", "a b", false).is_err());
    }

    #[test]
    fn sbatch_quoting_escapes_what_sbatch_reads() {
        assert_eq!(sbatch_quoted(r#"a "b" \c #d"#), r#""a \"b\" \\c #d""#);
    }

    #[test]
    fn kubernetes_names_and_quantities() {
        assert!(k8s_label("--name", "ddm-run-1", 54).is_ok());
        for bad in ["", "Ddm", "-a", "a-", "a_b", "a.b", &"a".repeat(55)] {
            assert!(k8s_label("--name", bad, 54).is_err(), "{bad:?}");
        }
        assert!(k8s_subdomain("--pvc", "data.store-1").is_ok());
        assert!(k8s_subdomain("--pvc", "data..x").is_err());
        for q in ["1", "500m", "32Gi", "1.5", "2e3", "+1", ".5", "1E-2"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", ".", "1.2.3", "5GB", "1e", "x", "1 "] {
            assert!(!is_quantity(q), "{q:?}");
        }
        assert_eq!(k8s_limit("nvidia.com/gpu=1").unwrap(), ("nvidia.com/gpu", "1"));
        assert!(k8s_limit("bad name=1").is_err());
        assert_eq!(k8s_literal("a$(B)$$"), "a$$(B)$$$$");
    }

    #[test]
    fn shell_words_refuse_nul_only() {
        assert_eq!(shell_word("--x", "a b").unwrap(), "'a b'");
        assert!(shell_word("--x", "a\0b").is_err());
        assert!(no_control("--out", "a\nb").is_err());
    }
}
