//! mvlt patch: element-wise work split over rayon's threads.
//!
//! burn-flex 0.21 runs matmuls, convolutions, softmax and layer norm on every core, but its
//! unary, binary and scalar maps and its strided copies on the calling thread alone: on the
//! demo's model (micro PVLT, 64 px, batch 64) they were three fifths of a training step's samples
//! on 2 cores, with the other core idle. These helpers split such a map into chunks of
//! [`CHUNK`] elements once it has [`MIN`] of them; below that, one thread does it as before.
//! Each element is computed by the same expression as before, so results are bit for bit the same.

/// Elements below which a map stays on the calling thread (dispatch costs more than it saves).
pub(crate) const MIN: usize = 32 * 1024;
/// Elements per rayon task.
pub(crate) const CHUNK: usize = 8 * 1024;

/// `f(offset, chunk)` over `dst` in chunks of [`CHUNK`] (a multiple of `align`), in parallel
/// when `dst` is large.
pub(crate) fn chunks_mut<E: Send>(dst: &mut [E], align: usize, f: impl Fn(usize, &mut [E]) + Sync + Send) {
    let align = align.max(1);
    let chunk = CHUNK.div_ceil(align) * align;
    #[cfg(feature = "rayon")]
    if dst.len() >= MIN && dst.len() > chunk {
        use rayon::prelude::*;
        dst.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i * chunk, c));
        return;
    }
    f(0, dst);
}

/// `src.map(op)` collected, in parallel when `src` is large.
pub(crate) fn map<E: Copy + Send + Sync, R: Send>(src: &[E], op: impl Fn(E) -> R + Sync + Send) -> alloc::vec::Vec<R> {
    #[cfg(feature = "rayon")]
    if src.len() >= MIN {
        use rayon::prelude::*;
        return src.par_iter().with_min_len(CHUNK).map(|&x| op(x)).collect();
    }
    src.iter().map(|&x| op(x)).collect()
}

/// `a.zip(b).map(op)` collected, in parallel when large.
pub(crate) fn zip_map<E: Copy + Send + Sync, R: Send>(
    a: &[E],
    b: &[E],
    op: impl Fn(E, E) -> R + Sync + Send,
) -> alloc::vec::Vec<R> {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(feature = "rayon")]
    if a.len() >= MIN {
        use rayon::prelude::*;
        return a.par_iter().zip(b.par_iter()).with_min_len(CHUNK).map(|(&x, &y)| op(x, y)).collect();
    }
    a.iter().zip(b).map(|(&x, &y)| op(x, y)).collect()
}

/// A strided read of `n` elements in row-major order of `shape` (positive strides, `offset` the
/// first element), written contiguous, rows split over threads when large.
pub(crate) fn gather<E: Copy + Send + Sync>(
    src: &[E],
    offset: usize,
    shape: &[usize],
    strides: &[isize],
) -> alloc::vec::Vec<E> {
    let n: usize = shape.iter().product();
    let nd = shape.len();
    if n == 0 {
        return alloc::vec::Vec::new();
    }
    let row = shape[nd - 1];
    let inner = strides[nd - 1];
    // The storage position of row `r` (all but the last index from `r`).
    let row_start = |mut r: usize| -> usize {
        let mut at = offset as isize;
        for d in (0..nd - 1).rev() {
            at += (r % shape[d]) as isize * strides[d];
            r /= shape[d];
        }
        at as usize
    };
    let fill = |first_row: usize, out: &mut [core::mem::MaybeUninit<E>]| {
        for (k, dst) in out.chunks_mut(row).enumerate() {
            let at = row_start(first_row + k);
            if inner == 1 {
                for (slot, &v) in dst.iter_mut().zip(&src[at..at + row]) {
                    slot.write(v);
                }
            } else {
                for (j, slot) in dst.iter_mut().enumerate() {
                    slot.write(src[(at as isize + j as isize * inner) as usize]);
                }
            }
        }
    };
    let mut out = alloc::vec::Vec::with_capacity(n);
    chunks_mut(&mut out.spare_capacity_mut()[..n], row, |start, chunk| fill(start / row, chunk));
    // SAFETY: the rows tile 0..n, so `fill` wrote every one of the first n elements.
    unsafe { out.set_len(n) };
    out
}
