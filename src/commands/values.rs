//! Value parsers for numeric flags with stated ranges: clap refuses a value outside the range with
//! the flag's name and the range in words, so no verb meets a number it cannot use (a Duration
//! that does not fit, a size that wraps, NaN).

use std::time::Duration;

use clap::builder::RangedU64ValueParser;

/// The most optimizer steps a training run takes (the trainer's own bound, which a TOML config
/// meets too).
pub const MAX_STEPS: u64 = ddm_trainer::config::MAX_STEPS;
/// The largest batch of training or sampling.
pub const MAX_BATCH: u64 = ddm_trainer::config::MAX_BATCH as u64;
/// The most samples one `ddm sample` (or evaluation) draws.
pub const MAX_SAMPLES: u64 = 10_000_000;
/// The most integration steps of a sampling.
pub const MAX_SAMPLING_STEPS: u64 = 100_000;
/// The most clusters (islands) of a partition.
pub const MAX_CLUSTERS: u64 = 4096;
/// The widest layer and the deepest stack of an MLP.
pub const MAX_WIDTH: u64 = ddm_trainer::config::MAX_MLP_WIDTH as u64;
pub const MAX_DEPTH: u64 = ddm_trainer::config::MAX_MLP_DEPTH as u64;

/// A whole number from `lo` to `hi` (as usize).
pub fn count(lo: u64, hi: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(lo..=hi)
}

/// A whole number from `lo` to `hi` (as u64).
pub fn count64(lo: u64, hi: u64) -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::<u64>::new().range(lo..=hi)
}

/// The longest time a timeout flag takes: one year.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

fn float(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// Seconds, from 0 to one year (fractions allowed).
pub fn seconds(s: &str) -> Result<Duration, String> {
    let v = float(s)?;
    if !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("{v} s is outside 0 ..= {MAX_SECONDS} (one year)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Milliseconds, from 0 to one hour (fractions allowed).
pub fn millis(s: &str) -> Result<Duration, String> {
    let v = float(s)?;
    if !(0.0..=3_600_000.0).contains(&v) {
        return Err(format!("{v} ms is outside 0 ..= 3600000 (one hour)"));
    }
    Ok(Duration::from_secs_f64(v / 1e3))
}

/// A memory size in MiB, above 0 and at most 2^40 MiB (one EiB): as bytes it fits in a u64.
pub fn mib(s: &str) -> Result<u64, String> {
    let v = float(s)?;
    let max = (1u64 << 40) as f64;
    if !(v > 0.0 && v <= max) {
        return Err(format!("{v} MiB is outside (0, {max}]"));
    }
    Ok((v * (1u64 << 20) as f64) as u64)
}

/// A classifier-free guidance scale: 0 to 100 (1 = none).
pub fn guidance(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{v} is outside 0 ..= 100"));
    }
    Ok(v)
}

/// A probability below 1: 0 <= p < 1 (dropout, an EMA decay).
pub fn below_one(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("{v} is outside 0 ..= 1 (1 excluded)"));
    }
    Ok(v)
}

/// A probability: 0 to 1.
pub fn probability(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is outside 0 ..= 1"));
    }
    Ok(v)
}

/// A finite f32 (a value range's end).
pub fn finite_f32(s: &str) -> Result<f32, String> {
    let v = float(s)?;
    if v.abs() > f32::MAX as f64 {
        return Err(format!("{v} does not fit a 32-bit float"));
    }
    Ok(v as f32)
}

/// A positive, finite number (a learning rate, a weight).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v <= 0.0 {
        return Err(format!("{v} is not above 0"));
    }
    Ok(v)
}

/// A finite number that is not negative.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err(format!("{v} is below 0"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_enforced_with_the_value_named() {
        assert_eq!(
            super::seconds("1.5").unwrap(),
            std::time::Duration::from_millis(1500)
        );
        for bad in ["-1", "nan", "inf", "1e300", "x"] {
            assert!(super::seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(super::mib("1").unwrap(), 1 << 20);
        assert!(super::mib("0").is_err() && super::mib("1e30").is_err());
        assert!(super::guidance("2").is_ok() && super::guidance("-0.5").is_err());
    }
}
