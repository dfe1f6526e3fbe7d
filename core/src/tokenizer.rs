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

/// The start- and end-of-text tokens of a [`word_level`] tokenizer (CLIP's spelling), ids 0 and
/// 1; id 2 is the unknown word. The end of text is also the padding, as in CLIP.
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const UNKNOWN: &str = "<unk>";

/// A word-level tokenizer for `captions` (lowercased, split at whitespace and punctuation): one id
/// per distinct word, most frequent first after the three special tokens, each caption wrapped in
/// start- and end-of-text. Sequences are `length` ids, or the longest caption's count if None.
/// For a text encoder trained from scratch on a small vocabulary (`ddm train-text-encoder`): the
/// result is an ordinary `tokenizer.json`, stored and read back like any other.
pub fn word_level(captions: &[String], length: Option<usize>) -> Result<TextTokenizer> {
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    let mut counts: std::collections::HashMap<String, u64> = Default::default();
    let mut longest = 0;
    for caption in captions {
        let mut split = PreTokenizedString::from(caption.to_lowercase().as_str());
        Whitespace {}
            .pre_tokenize(&mut split)
            .map_err(|e| Error::InvalidConfig(format!("cannot split the caption `{caption}`: {e}")))?;
        let words = split.get_splits(OffsetReferential::Original, OffsetType::Byte);
        longest = longest.max(words.len());
        for (word, _, _) in words {
            *counts.entry(word.to_string()).or_default() += 1;
        }
    }
    if counts.is_empty() {
        return Err(Error::InvalidConfig(
            "the captions hold no words: a tokenizer needs some".into(),
        ));
    }
    let mut words: Vec<(String, u64)> = counts.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let specials = [START_OF_TEXT, END_OF_TEXT, UNKNOWN];
    let mut vocab = serde_json::Map::new();
    for (id, token) in specials
        .iter()
        .copied()
        .chain(words.iter().map(|(w, _)| w.as_str()))
        .enumerate()
    {
        vocab.insert(token.to_string(), id.into());
    }
    let special = |token: &str, id: u32| serde_json::json!({"id": token, "ids": [id], "tokens": [token]});
    let template = |second: bool| {
        let mut t = vec![
            serde_json::json!({"SpecialToken": {"id": START_OF_TEXT, "type_id": 0}}),
            serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}),
            serde_json::json!({"SpecialToken": {"id": END_OF_TEXT, "type_id": 0}}),
        ];
        if second {
            t.push(serde_json::json!({"Sequence": {"id": "B", "type_id": 1}}));
            t.push(serde_json::json!({"SpecialToken": {"id": END_OF_TEXT, "type_id": 1}}));
        }
        t
    };
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template(false),
            "pair": template(true),
            "special_tokens": {START_OF_TEXT: special(START_OF_TEXT, 0), END_OF_TEXT: special(END_OF_TEXT, 1)},
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNKNOWN},
    });
    TextTokenizer::from_json(
        &json.to_string(),
        "the word-level tokenizer",
        length.unwrap_or(longest + 2),
        Pad::Id(1),
    )
}

impl TextTokenizer {
    /// How many ids the vocabulary holds (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_level_tokenizer_wraps_pads_and_round_trips() {
        let captions: Vec<String> = ["A dark boot.", "a light boot", "sneaker, wide"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = word_level(&captions, None).unwrap();
        // 3 specials + a, dark, boot, ".", light, sneaker, ",", wide.
        assert_eq!(t.vocab_size(), 11);
        assert_eq!(t.length(), 6); // "a dark boot ." + start + end
        let b = t.encode(&["a boot".into(), "A ZEBRA".into()]).unwrap();
        // Most frequent first: a (2) and boot (2), ordered by spelling, are ids 3 and 4.
        assert_eq!(&b.ids[..6], &[0, 3, 4, 1, 1, 1]);
        assert_eq!(&b.mask[..6], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&b.ids[6..10], &[0, 3, 2, 1]); // an unknown word is <unk>
        // Stored and read back, it tokenizes the same.
        let again = TextTokenizer::from_json(&t.to_json().unwrap(), "test", 6, Pad::Id(1)).unwrap();
        assert_eq!(again.encode(&captions).unwrap(), t.encode(&captions).unwrap());
        assert!(word_level(&["  ".into()], None).is_err());
    }
}
