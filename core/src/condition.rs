//! What a batch of samples is conditioned on, one type for every model, router and sampler: per
//! sample a class id, a pooled vector (a text embedding), or a token sequence with its mask; any of
//! them, or nothing. Each part has a null value (the null class, the zero vector, an all-padding
//! sequence) that classifier-free guidance and condition dropout use.

use burn::prelude::*;

/// Token embeddings `[N, L, D]` and their mask `[N, L]` (1: a token, 0: padding).
#[derive(Debug, Clone)]
pub struct Tokens {
    pub embeddings: Tensor<3>,
    pub mask: Tensor<2>,
}

/// The condition of N samples. Every part present has N rows.
#[derive(Debug, Clone, Default)]
pub struct Condition {
    /// Class ids `[N]`; a model's null class is its `num_classes`.
    pub class: Option<Tensor<1, Int>>,
    /// Pooled vectors `[N, D]` (the zero vector: no condition).
    pub vector: Option<Tensor<2>>,
    /// Token sequences.
    pub tokens: Option<Tokens>,
}

impl Condition {
    /// No condition.
    pub fn none() -> Self {
        Self::default()
    }

    /// Class ids `[N]`.
    pub fn class(y: Tensor<1, Int>) -> Self {
        Self {
            class: Some(y),
            ..Self::default()
        }
    }

    /// Class ids `[N]`, if any.
    pub fn maybe_class(y: Option<Tensor<1, Int>>) -> Self {
        Self {
            class: y,
            ..Self::default()
        }
    }

    /// Pooled vectors `[N, D]`.
    pub fn vector(c: Tensor<2>) -> Self {
        Self {
            vector: Some(c),
            ..Self::default()
        }
    }

    /// Token sequences: embeddings `[N, L, D]` and their mask `[N, L]`.
    pub fn tokens(embeddings: Tensor<3>, mask: Tensor<2>) -> Self {
        Self {
            tokens: Some(Tokens { embeddings, mask }),
            ..Self::default()
        }
    }

    pub fn is_none(&self) -> bool {
        self.class.is_none() && self.vector.is_none() && self.tokens.is_none()
    }

    /// The same condition without its class (what a router that does not see the class reads).
    pub fn without_class(&self) -> Self {
        Self {
            class: None,
            ..self.clone()
        }
    }

    /// The rows `idx` `[M]` of every part (the samples routed to one expert).
    pub fn select(&self, idx: &Tensor<1, Int>) -> Self {
        Self {
            class: self.class.clone().map(|y| y.select(0, idx.clone())),
            vector: self.vector.clone().map(|c| c.select(0, idx.clone())),
            tokens: self.tokens.clone().map(|t| Tokens {
                embeddings: t.embeddings.select(0, idx.clone()),
                mask: t.mask.select(0, idx.clone()),
            }),
        }
    }

    /// Rows `start..start + len` of every part (one batch of samples).
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Self {
            class: self.class.clone().map(|y| y.narrow(0, start, len)),
            vector: self.vector.clone().map(|c| c.narrow(0, start, len)),
            tokens: self.tokens.clone().map(|t| Tokens {
                embeddings: t.embeddings.narrow(0, start, len),
                mask: t.mask.narrow(0, start, len),
            }),
        }
    }

    /// Every part moved to `device` (a data-parallel replica's rows).
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            class: self.class.clone().map(|y| y.to_device(device)),
            vector: self.vector.clone().map(|c| c.to_device(device)),
            tokens: self.tokens.clone().map(|t| Tokens {
                embeddings: t.embeddings.to_device(device),
                mask: t.mask.to_device(device),
            }),
        }
    }

    /// The null condition of the same parts and rows: the null class `null_class`, zero
    /// vectors, sequences of padding only.
    pub fn null(&self, n: usize, null_class: usize, device: &Device) -> Self {
        Self {
            class: self
                .class
                .as_ref()
                .map(|_| Tensor::<1, Int>::full([n], null_class as i64, device)),
            vector: self.vector.as_ref().map(|c| c.zeros_like()),
            tokens: self.tokens.as_ref().map(|t| Tokens {
                embeddings: t.embeddings.zeros_like(),
                mask: t.mask.zeros_like(),
            }),
        }
    }

    /// This condition's rows, then `other`'s (`[2N]`: a guided batch's conditional and null
    /// halves). Both must have the same parts.
    pub fn cat(self, other: Self) -> Self {
        fn both<T>(a: Option<T>, b: Option<T>, f: impl FnOnce(T, T) -> T) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(f(a, b)),
                _ => None,
            }
        }
        Self {
            class: both(self.class, other.class, |a, b| Tensor::cat(vec![a, b], 0)),
            vector: both(self.vector, other.vector, |a, b| Tensor::cat(vec![a, b], 0)),
            tokens: both(self.tokens, other.tokens, |a, b| Tokens {
                embeddings: Tensor::cat(vec![a.embeddings, b.embeddings], 0),
                mask: Tensor::cat(vec![a.mask, b.mask], 0),
            }),
        }
    }

    /// The class ids on the host (for a request over the network).
    pub fn class_ids(&self) -> Option<Vec<i64>> {
        self.class
            .clone()
            .map(|y| y.into_data().convert::<i64>().iter::<i64>().collect())
    }
}
