//! The experts as the sampler holds them: local ones loaded on first use (and unloaded again when
//! a memory cap needs the room), served ones as a client of their server, missing ones as a gap
//! the strategy renormalises over.

use ddm_core::flow::VelocityField;

use crate::remote::RemoteExpert;

type Loader<'a> = Box<dyn Fn() -> anyhow::Result<Box<dyn VelocityField<2> + 'a>> + 'a>;

/// One expert: local (loaded on first use, unloaded when a memory cap needs the room), served
/// elsewhere, or missing.
pub struct ExpertSlot<'a> {
    pub(crate) loader: Option<Loader<'a>>,
    pub(crate) loaded: Option<Box<dyn VelocityField<2> + 'a>>,
    pub(crate) remote: Option<RemoteExpert>,
    /// Where it lives, for messages and reports: the server's URL or the checkpoint's path.
    pub(crate) location: String,
    /// What its weights take in memory once loaded (a lazy expert's checkpoint size), for the cap.
    pub(crate) bytes: u64,
    /// Times a lazy expert was loaded (more than once when a memory cap unloaded it).
    pub(crate) loads: usize,
    /// The evaluation that last selected it (the cap unloads the least recently used first).
    pub(crate) last_used: usize,
    /// A served expert that was called.
    pub(crate) called: bool,
    /// An expert that failed (and was renormalised away).
    pub(crate) lost: bool,
}

impl<'a> ExpertSlot<'a> {
    /// An expert loaded by `loader` the first time it is selected.
    pub fn lazy(loader: impl Fn() -> anyhow::Result<Box<dyn VelocityField<2> + 'a>> + 'a) -> Self {
        Self {
            loader: Some(Box::new(loader)),
            ..Self::missing()
        }
    }

    /// An expert already in memory.
    pub fn ready(field: Box<dyn VelocityField<2> + 'a>) -> Self {
        Self {
            loaded: Some(field),
            ..Self::missing()
        }
    }

    /// An expert served elsewhere (`ddm serve`).
    pub fn remote(expert: RemoteExpert) -> Self {
        Self {
            location: expert.client.base.clone(),
            remote: Some(expert),
            ..Self::missing()
        }
    }

    /// Where the expert lives (its checkpoint's path, say) and the bytes its weights take.
    pub fn at(mut self, location: impl Into<String>, bytes: u64) -> Self {
        self.location = location.into();
        self.bytes = bytes;
        self
    }

    /// A missing expert (its island failed or was never registered).
    pub fn missing() -> Self {
        Self {
            loader: None,
            loaded: None,
            remote: None,
            location: String::new(),
            bytes: 0,
            loads: 0,
            last_used: 0,
            called: false,
            lost: false,
        }
    }

    pub fn is_present(&self) -> bool {
        !self.lost && (self.loader.is_some() || self.loaded.is_some() || self.remote.is_some())
    }

    /// Loaded into this process (now or earlier), or (served elsewhere) called.
    pub fn is_loaded(&self) -> bool {
        self.loads > 0 || self.loaded.is_some() || self.called
    }

    /// Times it was loaded into this process.
    pub fn loads(&self) -> usize {
        self.loads
    }

    /// A lazy expert whose weights are in memory now (what a memory cap counts).
    pub(crate) fn holds_weights(&self) -> bool {
        self.loader.is_some() && self.loaded.is_some()
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Where it lives: the server's URL or the checkpoint's path.
    pub fn location(&self) -> &str {
        &self.location
    }
}

/// Local experts in memory under a cap: before expert `k` loads, the least recently used others
/// are unloaded until the weights held (each expert counted at its checkpoint's size) fit.
pub(crate) struct MemoryCap {
    pub bytes: u64,
    /// Experts unloaded to stay under the cap.
    pub evictions: usize,
}

impl MemoryCap {
    /// Unload the least recently used local experts until expert `k` fits.
    pub fn make_room(&mut self, experts: &mut [ExpertSlot<'_>], k: usize) -> anyhow::Result<()> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let need = experts[k].bytes;
        if need > self.bytes {
            anyhow::bail!(
                "expert {k} ({}) takes {:.1} MiB, more than the memory cap of {:.1} MiB",
                experts[k].location,
                mib(need),
                mib(self.bytes)
            );
        }
        loop {
            let held: u64 = experts
                .iter()
                .filter(|e| e.holds_weights())
                .map(|e| e.bytes)
                .sum();
            if held + need <= self.bytes {
                return Ok(());
            }
            let victim = (0..experts.len())
                .filter(|&e| e != k && experts[e].holds_weights())
                .min_by_key(|&e| experts[e].last_used)
                .expect("weights over the cap are held by some expert");
            tracing::debug!("unloading expert {victim} to make room for expert {k}");
            experts[victim].loaded = None;
            self.evictions += 1;
        }
    }
}
