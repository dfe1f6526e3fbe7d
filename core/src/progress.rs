//! How a long library step reports progress without knowing how it is shown. The command line
//! implements [`Progress`] with a terminal bar (hidden with `--quiet` or when stderr is not a
//! terminal); libraries call it and depend on nothing for display. `&()` reports nowhere.

/// A sink for the progress of one long step: `begin`, any number of `advance`, `finish`.
pub trait Progress: Sync {
    /// A step named `what` of `total` units starts (0: unknown length).
    fn begin(&self, _what: &str, _total: u64) {}
    /// `n` more units are done.
    fn advance(&self, _n: u64) {}
    /// The step is over.
    fn finish(&self) {}
}

/// No progress shown.
impl Progress for () {}
