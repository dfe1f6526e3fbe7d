//! Element-wise loops split across rayon's threads (a ddm patch; see VENDORED.md).
//!
//! Unary, binary and scalar element-wise kernels were single-threaded, so on a 2-core machine
//! about half of a DiT training step (everything but the matrix products) ran on one core. Each
//! element is computed by the same closure whatever the split, so results are bit-identical to the
//! sequential loops for any thread count.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

/// Below this many elements a loop stays on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 15;
/// Elements per rayon task.
const CHUNK: usize = 1 << 13;

#[cfg(feature = "rayon")]
fn parallel(n: usize) -> bool {
    n >= PAR_MIN && rayon::current_num_threads() > 1
}

/// `x = op(x)` for every element.
pub(crate) fn map_inplace<E: Copy + Send + Sync>(s: &mut [E], op: impl Fn(E) -> E + Sync) {
    #[cfg(feature = "rayon")]
    if parallel(s.len()) {
        use rayon::prelude::*;
        s.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x = op(*x)));
        return;
    }
    s.iter_mut().for_each(|x| *x = op(*x));
}

/// `op(x)` for every element, in order.
pub(crate) fn map<E: Copy + Send + Sync, O: Send>(s: &[E], op: impl Fn(E) -> O + Sync) -> Vec<O> {
    #[cfg(feature = "rayon")]
    if parallel(s.len()) {
        use rayon::prelude::*;
        return s.par_iter().with_min_len(CHUNK).map(|&x| op(x)).collect();
    }
    s.iter().map(|&x| op(x)).collect()
}

/// `l = op(l, r)` element by element (`r` at least as long as `l`).
pub(crate) fn zip_inplace<E: Copy + Send + Sync, R: Copy + Send + Sync>(
    l: &mut [E],
    r: &[R],
    op: impl Fn(E, R) -> E + Sync,
) {
    #[cfg(feature = "rayon")]
    if parallel(l.len()) {
        use rayon::prelude::*;
        l.par_chunks_mut(CHUNK)
            .zip(r.par_chunks(CHUNK))
            .for_each(|(lc, rc)| lc.iter_mut().zip(rc).for_each(|(x, &y)| *x = op(*x, y)));
        return;
    }
    l.iter_mut().zip(r).for_each(|(x, &y)| *x = op(*x, y));
}

/// `op(a, b)` element by element, in order.
pub(crate) fn zip<E: Copy + Send + Sync, O: Send>(a: &[E], b: &[E], op: impl Fn(E, E) -> O + Sync) -> Vec<O> {
    #[cfg(feature = "rayon")]
    if parallel(a.len()) {
        use rayon::prelude::*;
        return a
            .par_iter()
            .zip(b.par_iter())
            .with_min_len(CHUNK)
            .map(|(&x, &y)| op(x, y))
            .collect();
    }
    a.iter().zip(b).map(|(&x, &y)| op(x, y)).collect()
}

/// Run a slice kernel (`kernel(dst, src)`, e.g. a SIMD add) on matching pieces of `dst` and `src`.
pub(crate) fn kernel2<E: Send + Sync>(dst: &mut [E], src: &[E], kernel: impl Fn(&mut [E], &[E]) + Sync) {
    #[cfg(feature = "rayon")]
    if parallel(dst.len()) {
        use rayon::prelude::*;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| kernel(d, s));
        return;
    }
    kernel(dst, src);
}

/// Fill `out` (uninitialised, `rows * row_len` long) row block by row block: `fill(first_row,
/// piece)` writes every element of `piece`, which holds whole rows starting at `first_row`.
/// Returns false (and writes nothing) when the work is too small to split.
pub(crate) fn fill_rows<O: Send>(
    out: &mut [MaybeUninit<O>],
    row_len: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<O>]) + Sync,
) -> bool {
    #[cfg(feature = "rayon")]
    if parallel(out.len()) && row_len > 0 && out.len() / row_len > 1 {
        use rayon::prelude::*;
        let rows_per_task = CHUNK.div_ceil(row_len).max(1);
        out.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, piece)| fill(i * rows_per_task, piece));
        return true;
    }
    let _ = (out, row_len, &fill);
    false
}

/// Apply `f(first_row, piece)` to `dst` split into blocks of whole rows (`row_len` each).
/// Returns false (and does nothing) when the work is too small to split.
pub(crate) fn rows_inplace<D: Send>(dst: &mut [D], row_len: usize, f: impl Fn(usize, &mut [D]) + Sync) -> bool {
    #[cfg(feature = "rayon")]
    if parallel(dst.len()) && row_len > 0 && dst.len() / row_len > 1 {
        use rayon::prelude::*;
        let rows_per_task = CHUNK.div_ceil(row_len).max(1);
        dst.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, piece)| f(i * rows_per_task, piece));
        return true;
    }
    let _ = (dst, row_len, &f);
    false
}

/// Run a slice kernel (`kernel(piece)`) on pieces of `s`, in parallel when large.
pub(crate) fn slices_inplace<E: Send>(s: &mut [E], kernel: impl Fn(&mut [E]) + Sync) {
    #[cfg(feature = "rayon")]
    if parallel(s.len()) {
        use rayon::prelude::*;
        s.par_chunks_mut(CHUNK).for_each(|c| kernel(c));
        return;
    }
    kernel(s);
}
