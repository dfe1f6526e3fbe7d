//! Captions -> token ids, through a `tokenizer.json` (the Hugging Face `tokenizers` format that
//! transformers' fast tokenizers save; CLIP's is a byte-level BPE). Every caption becomes exactly
//! `length` ids: cut to fit (the end-of-text token kept), then padded, with a mask that is 1 at
//! tokens and 0 at padding.

use std::str::FromStr;

use burn::prelude::*;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// Token ids `[N, L]` and their mask `[N, L]`, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<f32>,
    pub n: usize,
    pub length: usize,
}

impl TokenBatch {
    /// The ids `[N, L]` and mask `[N, L]` on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let shape = [self.n, self.length];
        (
            Tensor::from_data(TensorData::new(self.ids.clone(), shape), device),
            Tensor::from_data(TensorData::new(self.mask.clone(), shape), device),
        )
    }
}

/// A tokenizer that writes fixed-length sequences.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    length: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(length {})", self.length)
    }
}

/// The token sequences are padded with, where a `tokenizer.json` sets no padding of its own.
#[derive(Debug, Clone, Copy)]
pub enum Pad<'a> {
    /// By its text (transformers' `tokenizer_config.json` names it so).
    Token(&'a str),
    /// By its id (an encoder config's end-of-text id).
    Id(u32),
}

impl TextTokenizer {
    /// Read `json` (a `tokenizer.json`'s text; `origin` is named in errors) for sequences of
    /// `length` ids, padded with `pad` where the file sets no padding of its own.
    pub fn from_json(json: &str, origin: &str, length: usize, pad: Pad<'_>) -> Result<Self> {
        let bad = |reason: String| Error::InvalidConfig(format!("{origin}: {reason}"));
        let mut inner = Tokenizer::from_str(json).map_err(|e| bad(format!("not a tokenizer.json: {e}")))?;
        let pad_token = match (inner.get_padding(), pad) {
            (Some(p), _) => (p.pad_id, p.pad_token.clone()),
            (None, Pad::Token(token)) => {
                let id = inner
                    .token_to_id(token)
                    .ok_or_else(|| bad(format!("the padding token `{token}` is not in its vocabulary")))?;
                (id, token.to_string())
            }
            (None, Pad::Id(id)) => {
                let token = inner
                    .id_to_token(id)
                    .ok_or_else(|| bad(format!("the padding id {id} is not in its vocabulary")))?;
                (id, token)
            }
        };
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            direction: PaddingDirection::Right,
            pad_id: pad_token.0,
            pad_token: pad_token.1,
            ..PaddingParams::default()
        }));
        inner
            .with_truncation(Some(TruncationParams {
                max_length: length,
                ..TruncationParams::default()
            }))
            .map_err(|e| bad(format!("cannot cut sequences to {length} tokens: {e}")))?;
        Ok(Self { inner, length })
    }

    /// This tokenizer as a `tokenizer.json` text, its padding and length included (what a
    /// checkpoint stores: read back, it tokenizes the same).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::InvalidConfig(format!("cannot write the tokenizer: {e}")))
    }

    pub fn length(&self) -> usize {
        self.length
    }

    /// The ids of `captions`, with the special tokens the file's post-processor adds (CLIP's
    /// start- and end-of-text).
    pub fn encode(&self, captions: &[String]) -> Result<TokenBatch> {
        let inputs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::InvalidConfig(format!("cannot tokenize: {e}")))?;
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(captions.len() * self.length),
            mask: Vec::with_capacity(captions.len() * self.length),
            n: captions.len(),
            length: self.length,
        };
        for e in &encodings {
            batch.ids.extend(e.get_ids().iter().map(|&i| i as i64));
            batch
                .mask
                .extend(e.get_attention_mask().iter().map(|&m| m as f32));
        }
        Ok(batch)
    }
}
