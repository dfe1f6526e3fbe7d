//! Inference strategies: how the router's weights p(k | x_t, t) pick and weight experts, per
//! sample and per step (docs/ARCHITECTURE.md, "The math convention"). Every strategy returns
//! (expert, weight) pairs whose weights sum to 1 over the experts that are present (an island
//! that failed is renormalised away).

use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Strategy {
    /// Weighted sum of all experts.
    Full,
    /// The k most probable experts, weights renormalised.
    TopK { k: usize },
    /// One expert drawn from the router's distribution at temperature T.
    Sample { temperature: f64 },
    /// One expert drawn from the smallest set with mass >= p (at temperature T).
    Nucleus { p: f64, temperature: f64 },
    /// Experts with weight >= tau, renormalised (the most probable one if none reaches tau).
    Threshold { tau: f64 },
    /// One expert per sample, drawn from the router's posterior at the first step (at t = 1:
    /// p(k | c), or the prior) and kept for the whole trajectory: with perfect experts this
    /// samples the mixture exactly, at one expert per step and one router call per sample.
    Trajectory,
    /// The cluster the sample is known to belong to (evaluation only).
    Oracle { cluster: usize },
}

impl FromStr for Strategy {
    type Err = String;

    /// `full`, `top-1`, `top-K`, `sample[:T]`, `nucleus:P[:T]`, `threshold:TAU`, `trajectory`,
    /// `oracle:K`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("bad number `{v}` in strategy `{s}`"))
        };
        let st = match parts.as_slice() {
            ["full"] => Strategy::Full,
            ["trajectory"] => Strategy::Trajectory,
            [top] if top.starts_with("top-") => {
                let k = top[4..]
                    .parse()
                    .map_err(|_| format!("bad k in `{s}`: expected top-1, top-2, ..."))?;
                if k == 0 {
                    return Err("top-k needs k >= 1".into());
                }
                Strategy::TopK { k }
            }
            ["sample"] => Strategy::Sample { temperature: 1.0 },
            ["sample", t] => Strategy::Sample { temperature: num(t)? },
            ["nucleus", p] => Strategy::Nucleus {
                p: num(p)?,
                temperature: 1.0,
            },
            ["nucleus", p, t] => Strategy::Nucleus {
                p: num(p)?,
                temperature: num(t)?,
            },
            ["threshold", tau] => Strategy::Threshold { tau: num(tau)? },
            ["oracle", k] => Strategy::Oracle {
                cluster: k.parse().map_err(|_| format!("bad cluster in `{s}`"))?,
            },
            _ => {
                return Err(format!(
                    "unknown strategy `{s}`: expected full, top-1, top-K, sample[:T], nucleus:P[:T], threshold:TAU, trajectory or oracle:K"
                ));
            }
        };
        st.validate().map_err(|e| format!("strategy `{s}`: {e}"))?;
        Ok(st)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Full => write!(f, "full"),
            Strategy::TopK { k } => write!(f, "top-{k}"),
            Strategy::Sample { temperature } => write!(f, "sample:{temperature}"),
            Strategy::Nucleus { p, temperature } => write!(f, "nucleus:{p}:{temperature}"),
            Strategy::Threshold { tau } => write!(f, "threshold:{tau}"),
            Strategy::Trajectory => write!(f, "trajectory"),
            Strategy::Oracle { cluster } => write!(f, "oracle:{cluster}"),
        }
    }
}

/// Renormalise `probs` over the present experts (absent ones get 0).
fn present_only(probs: &[f64], present: &[bool]) -> Vec<f64> {
    let z: f64 = probs
        .iter()
        .zip(present)
        .filter(|(_, p)| **p)
        .map(|(v, _)| v)
        .sum();
    probs
        .iter()
        .zip(present)
        .map(|(v, p)| {
            if *p {
                if z > 0.0 {
                    v / z
                } else {
                    1.0 / present.iter().filter(|p| **p).count() as f64
                }
            } else {
                0.0
            }
        })
        .collect()
}

fn tempered(p: &[f64], temperature: f64) -> Vec<f64> {
    let w: Vec<f64> = p
        .iter()
        .map(|&v| {
            if v > 0.0 {
                v.powf(1.0 / temperature.max(1e-6))
            } else {
                0.0
            }
        })
        .collect();
    let z: f64 = w.iter().sum();
    w.into_iter().map(|v| v / z).collect()
}

fn draw(p: &[f64], rng: &mut impl Rng) -> usize {
    let mut r = rng.random::<f64>();
    for (k, &v) in p.iter().enumerate() {
        r -= v;
        if r < 0.0 {
            return k;
        }
    }
    p.iter().rposition(|&v| v > 0.0).unwrap_or(0)
}

fn by_weight(p: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&k| p[k] > 0.0).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order
}

impl Strategy {
    /// `ddm sample`'s default, chosen from the paper table (README): when the router sees the
    /// class, top-1 (class-conditional Fashion-MNIST: the best FD at the lowest cost, beating the
    /// FLOP-matched monolith, as in the DDM paper); otherwise one expert per trajectory, which
    /// costs what top-1 costs but is not biased toward the largest cluster (top-1 with a router
    /// that cannot tell the clusters apart at t = 1 sends every sample there first).
    pub fn default_for(router_sees_class: bool) -> Self {
        match router_sees_class {
            true => Strategy::TopK { k: 1 },
            false => Strategy::Trajectory,
        }
    }

    /// Parameters in range: a temperature T > 0, a nucleus mass P and a threshold TAU in (0, 1]
    /// (finite numbers; NaN is refused).
    pub fn validate(&self) -> Result<(), String> {
        let temperature = |t: f64| match t.is_finite() && t > 0.0 {
            true => Ok(()),
            false => Err(format!("temperature {t} must be a positive number")),
        };
        let unit = |what: &str, v: f64| match v > 0.0 && v <= 1.0 {
            true => Ok(()),
            false => Err(format!("{what} {v} must be in (0, 1]")),
        };
        match *self {
            Strategy::Sample { temperature: t } => temperature(t),
            Strategy::Nucleus { p, temperature: t } => unit("nucleus mass", p).and(temperature(t)),
            Strategy::Threshold { tau } => unit("threshold", tau),
            _ => Ok(()),
        }
    }

    /// The experts to run for one sample, with weights summing to 1.
    /// `probs`: the router's p(k | x_t, t); `present`: which experts exist (at least one).
    pub fn select(&self, probs: &[f64], present: &[bool], rng: &mut impl Rng) -> Vec<(usize, f64)> {
        let p = present_only(probs, present);
        let renorm = |sel: Vec<usize>| {
            let z: f64 = sel.iter().map(|&k| p[k]).sum();
            sel.into_iter()
                .map(|k| (k, if z > 0.0 { p[k] / z } else { 1.0 }))
                .collect::<Vec<_>>()
        };
        match *self {
            Strategy::Full => (0..p.len()).filter(|&k| present[k]).map(|k| (k, p[k])).collect(),
            Strategy::TopK { k } => {
                let mut order = by_weight(&p);
                if order.is_empty() {
                    order = (0..p.len()).filter(|&k| present[k]).collect();
                }
                order.truncate(k);
                renorm(order)
            }
            Strategy::Sample { temperature } => vec![(draw(&tempered(&p, temperature), rng), 1.0)],
            // The draw; the ensemble keeps it for the rest of the trajectory.
            Strategy::Trajectory => vec![(draw(&p, rng), 1.0)],
            Strategy::Nucleus { p: mass, temperature } => {
                let q = tempered(&p, temperature);
                let mut nucleus = vec![];
                let mut acc = 0.0;
                for k in by_weight(&q) {
                    nucleus.push(k);
                    acc += q[k];
                    if acc >= mass {
                        break;
                    }
                }
                let sub: Vec<f64> = (0..q.len())
                    .map(|k| if nucleus.contains(&k) { q[k] } else { 0.0 })
                    .collect();
                let z: f64 = sub.iter().sum();
                vec![(draw(&sub.iter().map(|v| v / z).collect::<Vec<_>>(), rng), 1.0)]
            }
            Strategy::Threshold { tau } => {
                let sel: Vec<usize> = (0..p.len()).filter(|&k| present[k] && p[k] >= tau).collect();
                if sel.is_empty() {
                    renorm(by_weight(&p).into_iter().take(1).collect())
                } else {
                    renorm(sel)
                }
            }
            Strategy::Oracle { cluster } => vec![(cluster, 1.0)],
        }
    }

    /// Expert evaluations per sample per step (the cost column of the paper's table), at most.
    pub fn experts_per_sample(&self, k: usize) -> usize {
        match *self {
            Strategy::Full => k,
            Strategy::TopK { k: top } => top.min(k),
            Strategy::Threshold { .. } => k,
            _ => 1,
        }
    }

    /// Whether the strategy needs the router.
    pub fn uses_router(&self) -> bool {
        !matches!(self, Strategy::Oracle { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parses_every_strategy() {
        for s in [
            "full",
            "top-1",
            "top-2",
            "sample",
            "sample:0.5",
            "nucleus:0.9",
            "nucleus:0.9:2",
            "threshold:0.1",
            "trajectory",
            "oracle:3",
        ] {
            let st: Strategy = s.parse().unwrap();
            assert_eq!(st.to_string().parse::<Strategy>().unwrap(), st, "{s}");
        }
        assert!("top-0".parse::<Strategy>().is_err());
        for bad in [
            "threshold:2",
            "threshold:0",
            "threshold:nan",
            "nucleus:0",
            "nucleus:0.9:0",
            "sample:0",
            "sample:-1",
            "sample:inf",
        ] {
            let e = bad.parse::<Strategy>().unwrap_err();
            assert!(e.contains(bad) && (e.contains("must be")), "{bad}: {e}");
        }
        assert!("best".parse::<Strategy>().unwrap_err().contains("expected full"));
    }

    #[test]
    fn deterministic_strategies() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let p = [0.1, 0.5, 0.15, 0.25];
        let all = [true; 4];
        assert_eq!(Strategy::TopK { k: 1 }.select(&p, &all, &mut rng), vec![(1, 1.0)]);
        let top2 = Strategy::TopK { k: 2 }.select(&p, &all, &mut rng);
        assert_eq!(top2.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((top2[0].1 - 0.5 / 0.75).abs() < 1e-12);
        let th = Strategy::Threshold { tau: 0.2 }.select(&p, &all, &mut rng);
        assert_eq!(th.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(
            Strategy::Threshold { tau: 0.9 }.select(&p, &all, &mut rng),
            vec![(1, 1.0)]
        );
        // Full with expert 1 missing: renormalised over the others.
        let full = Strategy::Full.select(&p, &[true, false, true, true], &mut rng);
        assert_eq!(full.len(), 3);
        assert!((full.iter().map(|s| s.1).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((full[0].1 - 0.1 / 0.5).abs() < 1e-12);
        assert_eq!(
            Strategy::TopK { k: 1 }.select(&p, &[true, false, true, true], &mut rng),
            vec![(3, 1.0)]
        );
    }

    #[test]
    fn sample_frequencies_follow_the_router() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let p = [0.1, 0.5, 0.15, 0.25];
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[Strategy::Sample { temperature: 1.0 }.select(&p, &[true; 4], &mut rng)[0].0] += 1;
        }
        for k in 0..4 {
            let f = counts[k] as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (p[k] * (1.0 - p[k]) / n as f64).sqrt();
            assert!((f - p[k]).abs() < 5.0 * sd, "expert {k}: {f} vs {}", p[k]);
        }
        // Nucleus 0.7 keeps experts 1 and 3 only.
        for _ in 0..1000 {
            let k = Strategy::Nucleus {
                p: 0.7,
                temperature: 1.0,
            }
            .select(&p, &[true; 4], &mut rng)[0]
                .0;
            assert!(k == 1 || k == 3);
        }
    }
}
