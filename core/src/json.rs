//! The JSON documents ddm writes for itself to read back (checkpoint metadata, partition and
//! registry manifests, statistics, reports). serde_json writes NaN and infinity as `null`, which
//! then fails to parse as a number, or parses as "absent" in an optional field: a file ddm wrote
//! and cannot read. Every such document is serialised here, and a non-finite number is an error
//! naming where it is.

use serde::Serialize;
use serde_value::Value;

use crate::error::{Error, Result};

/// `value` as compact JSON; `what` names the document in the error.
pub fn to_string<T: Serialize>(what: &str, value: &T) -> Result<String> {
    check(what, value)?;
    serde_json::to_string(value).map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))
}

/// `value` as indented JSON bytes; `what` names the document in the error.
pub fn to_vec_pretty<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    check(what, value)?;
    serde_json::to_vec_pretty(value).map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))
}

/// An error naming the first non-finite number in `value` (as `field.sub[3]`), if there is one.
pub fn check<T: Serialize>(what: &str, value: &T) -> Result<()> {
    let tree = serde_value::to_value(value).map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))?;
    match first_non_finite(&tree, String::new()) {
        None => Ok(()),
        Some((at, value)) => Err(Error::NonFiniteJson {
            what: what.to_string(),
            at: if at.is_empty() { "the value".into() } else { at },
            value,
        }),
    }
}

fn first_non_finite(v: &Value, at: String) -> Option<(String, f64)> {
    match v {
        Value::F32(x) if !x.is_finite() => Some((at, *x as f64)),
        Value::F64(x) if !x.is_finite() => Some((at, *x)),
        Value::Option(Some(inner)) | Value::Newtype(inner) => first_non_finite(inner, at),
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| first_non_finite(x, format!("{at}[{i}]"))),
        Value::Map(map) => map.iter().find_map(|(k, x)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            let path = if at.is_empty() { key } else { format!("{at}.{key}") };
            first_non_finite(x, path)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct Doc {
        name: &'static str,
        range: [f32; 2],
        loss: Option<f64>,
        nested: Vec<std::collections::BTreeMap<String, f64>>,
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let ok = Doc {
            name: "x",
            range: [-1.0, 1.0],
            loss: Some(0.5),
            nested: vec![],
        };
        assert_eq!(
            super::to_string("doc", &ok).unwrap(),
            serde_json::to_string(&ok).unwrap()
        );
        let bad = Doc {
            range: [-1.0, f32::NAN],
            ..ok
        };
        let e = super::to_string("partition.json", &bad).unwrap_err().to_string();
        assert!(
            e.contains("partition.json") && e.contains("range[1] is NaN"),
            "{e}"
        );
        let bad = Doc {
            name: "x",
            range: [0.0, 1.0],
            loss: None,
            nested: vec![[("a".to_string(), f64::INFINITY)].into()],
        };
        let e = super::to_string("report", &bad).unwrap_err().to_string();
        assert!(e.contains("nested[0].a is inf"), "{e}");
    }
}
