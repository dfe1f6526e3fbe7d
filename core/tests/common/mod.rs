//! Helpers shared by the kernel tests (`fused.rs`, `update.rs`).

/// Each value within `tol` of the expected one, relative to 1 + |expected|.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}] = {g}, expected {w}"
        );
    }
}
