//! Tensors on the host, and safetensors files of named tensors.
//!
//! `HostTensor` is the backend-neutral form a tensor takes at every file boundary (checkpoints,
//! `ddm predict` inputs and outputs): a shape and row-major `f32` values. `TensorFile` reads a
//! whole safetensors file, validates it, and hands out its tensors by name with errors that name
//! the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::prelude::*;
pub use safetensors::Dtype;
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// The memory this machine has available (`MemAvailable` from /proc/meminfo), in bytes; None
/// where that is not known.
pub fn available_memory() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// A dense `f32` tensor on the host: shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not match {} values",
            data.len()
        );
        Self { shape, data }
    }

    /// Copy a device tensor to the host (a device sync point).
    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("converted tensor data is f32");
        Self { shape, data }
    }

    /// Upload to `device`. Panics if the rank is not `D` (callers check shapes first).
    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        assert_eq!(
            self.shape.len(),
            D,
            "rank mismatch: tensor of shape {:?} used as rank {D}",
            self.shape
        );
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }

    /// Transpose a rank-2 tensor (PyTorch Linear weights are `[out, in]`, burn's are `[in, out]`).
    pub fn transpose2(&self) -> Self {
        let [r, c] = [self.shape[0], self.shape[1]];
        let mut data = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self {
            shape: vec![c, r],
            data,
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    fn le_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// An integer tensor read from a file (class labels `y`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostIntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// A tensor as stored: dtype, shape, little-endian bytes, and where they lie in the data section.
#[derive(Debug, Clone)]
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    offsets: (usize, usize),
}

/// All tensors and the string metadata of one safetensors file.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    tensors: BTreeMap<String, Stored>,
    pub metadata: HashMap<String, String>,
    /// The file's bytes after the header, in file order: what the checkpoint checksum covers.
    data_section: std::ops::Range<usize>,
    raw: Vec<u8>,
}

impl TensorFile {
    /// Read and validate a safetensors file. A truncated or corrupted file is an error naming it.
    pub fn read(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, raw)
    }

    pub fn from_bytes(path: &Path, raw: Vec<u8>) -> Result<Self> {
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, meta) = SafeTensors::read_metadata(&raw).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(&raw).map_err(|e| bad(e.to_string()))?;
        let table = meta.tensors();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            tensors.insert(
                name.to_string(),
                Stored {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                    offsets: table[name].data_offsets,
                },
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        let start = 8 + header_len;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
            data_section: start..raw.len(),
            raw,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The bytes of the data section (all tensor bytes, in file order).
    pub fn data_bytes(&self) -> &[u8] {
        &self.raw[self.data_section.clone()]
    }

    /// sha256 of the header's tensor table: which name points at which bytes, with what dtype and
    /// shape. With the data section's sha256 it binds every tensor to its name (a header whose
    /// table was edited, say two names swapped, hashes differently).
    pub fn table_sha256(&self) -> String {
        table_sha256(
            self.tensors
                .iter()
                .map(|(n, s)| (n.as_str(), s.dtype, s.shape.as_slice(), s.offsets)),
        )
    }

    /// A floating-point tensor by name, converted to `f32` (F32, F16, BF16 and F64 are read).
    pub fn f32(&self, name: &str) -> Result<HostTensor> {
        let s = self.get(name)?;
        let data: Vec<f32> = match s.dtype {
            Dtype::F32 => s
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => s
                .bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F16 => s
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => s
                .bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => return Err(self.dtype_error(name, other, "a float (F32, F16, BF16, F64)")),
        };
        Ok(HostTensor {
            shape: s.shape.clone(),
            data,
        })
    }

    /// A `u8` tensor by name (image data), with its shape.
    pub fn u8(&self, name: &str) -> Result<(Vec<usize>, &[u8])> {
        let s = self.get(name)?;
        if s.dtype != Dtype::U8 {
            return Err(self.dtype_error(name, s.dtype, "U8"));
        }
        Ok((s.shape.clone(), &s.bytes))
    }

    /// The dtype and shape of a tensor by name.
    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let s = self.get(name)?;
        Ok((s.dtype, s.shape.clone()))
    }

    /// An integer tensor by name (I64, I32, U8 are read).
    pub fn i64(&self, name: &str) -> Result<HostIntTensor> {
        let s = self.get(name)?;
        let data: Vec<i64> = match s.dtype {
            Dtype::I64 => s
                .bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => s
                .bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
            Dtype::U8 => s.bytes.iter().map(|&b| b as i64).collect(),
            other => return Err(self.dtype_error(name, other, "an integer (I64, I32, U8)")),
        };
        Ok(HostIntTensor {
            shape: s.shape.clone(),
            data,
        })
    }

    fn get(&self, name: &str) -> Result<&Stored> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    fn dtype_error(&self, name: &str, dtype: Dtype, expected: &'static str) -> Error {
        Error::Dtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
            expected,
        }
    }
}

/// A tensor in any safetensors dtype, as little-endian bytes (for u8 image shards and the like).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    pub fn u8(shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape,
            bytes,
        }
    }

    pub fn f32(t: &HostTensor) -> Self {
        Self {
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            bytes: t.le_bytes(),
        }
    }

    pub fn i64(shape: Vec<usize>, data: &[i64]) -> Self {
        Self {
            dtype: Dtype::I64,
            shape,
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Serialise named raw tensors with string metadata to safetensors bytes (deterministic).
pub fn raw_to_safetensors_bytes(
    tensors: &BTreeMap<String, RawTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| Error::InvalidConfig(format!("cannot serialise tensors: {e}")))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::InvalidConfig(format!("cannot serialise tensors: {e}")))
}

/// Serialise named `f32` tensors (and optional int64 tensors) with string metadata to safetensors
/// bytes. The same tensors always give the same bytes.
pub fn to_safetensors_bytes(
    tensors: &BTreeMap<String, HostTensor>,
    int_tensors: &BTreeMap<String, HostIntTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut raw: BTreeMap<String, RawTensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), RawTensor::f32(t)))
        .collect();
    for (n, t) in int_tensors {
        raw.insert(n.clone(), RawTensor::i64(t.shape.clone(), &t.data));
    }
    raw_to_safetensors_bytes(&raw, metadata)
}

/// sha256 of a tensor table given in name order: one line per tensor, `name dtype shape begin
/// end` as JSON (`["w","F32",[2,3],0,24]`), offsets into the data section.
pub fn table_sha256<'a>(
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], (usize, usize))>,
) -> String {
    let mut text = String::new();
    for (name, dtype, shape, (begin, end)) in tensors {
        let line = serde_json::json!([name, format!("{dtype:?}"), shape, begin, end]);
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::digest::sha256_hex(text.as_bytes())
}

/// [`table_sha256`] of serialised safetensors bytes, read from their header alone.
pub fn table_sha256_of(bytes: &[u8]) -> Result<String> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::InvalidConfig(format!("cannot read a tensor table: {e}")))?;
    let table: BTreeMap<String, &safetensors::tensor::TensorInfo> = meta.tensors().into_iter().collect();
    Ok(table_sha256(table.iter().map(|(n, i)| {
        (n.as_str(), i.dtype, i.shape.as_slice(), i.data_offsets)
    })))
}

/// Data-section bytes of a serialised safetensors buffer (what the checkpoint checksum covers).
pub fn data_section(bytes: &[u8]) -> &[u8] {
    let n = u64::from_le_bytes(
        bytes[..8]
            .try_into()
            .expect("safetensors buffer has an 8-byte header length"),
    ) as usize;
    &bytes[8 + n..]
}

/// Write named tensors to `path` atomically (used for `ddm predict` outputs and test inputs).
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    int_tensors: &BTreeMap<String, HostIntTensor>,
) -> Result<()> {
    let bytes = to_safetensors_bytes(tensors, int_tensors, None)?;
    crate::fsio::write_bytes_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose2_swaps_axes() {
        let t = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let tt = t.transpose2();
        assert_eq!(tt.shape, vec![3, 2]);
        assert_eq!(tt.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(tt.transpose2(), t);
    }

    #[test]
    fn file_round_trip_and_dtype_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut f = BTreeMap::new();
        f.insert(
            "x".to_string(),
            HostTensor::new(vec![2, 2], vec![1.5, -2.0, 0.25, 3.0]),
        );
        let mut i = BTreeMap::new();
        i.insert(
            "y".to_string(),
            HostIntTensor {
                shape: vec![2],
                data: vec![3, -1],
            },
        );
        write_tensors(&p, &f, &i).unwrap();
        let tf = TensorFile::read(&p).unwrap();
        assert_eq!(tf.f32("x").unwrap(), f["x"]);
        assert_eq!(tf.i64("y").unwrap(), i["y"]);
        assert!(tf.f32("y").unwrap_err().to_string().contains("dtype"));
        assert!(
            tf.f32("nope")
                .unwrap_err()
                .to_string()
                .contains("`nope` is missing")
        );
    }
}
