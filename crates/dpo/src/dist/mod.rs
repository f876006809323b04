//! Data parallelism: the same run in several processes (ranks), each computing the gradient of its share
//! of every micro-batch, the shares' gradients summed, and every rank applying the identical update.
//!
//! ```text
//! mod.rs     Collective: what the loop needs of the ranks (rank, size, a deterministic sum, gathering
//!            bytes); the process's world (one process unless a launcher set another); the gradient sum
//! shard.rs   a micro-batch split into contiguous shares, each share's weight in the loss's mean, and
//!            the ranks' metrics combined into the micro-batch's
//! mpi.rs     the world of `mpirun` / `srun` over MPI (rsmpi, cargo feature `mpi`)
//! ```
//!
//! The training loop calls [`run_share`] where it ran a micro-batch and [`reduce_grads`] once before the
//! update; with one process both are what they replace, bit for bit.

#[cfg(feature = "mpi")]
pub mod mpi;
mod shard;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use engine::ParamSet;

pub use shard::{run_share, share_of, SplitWeight};

/// What a data-parallel run needs of its processes. Every call is collective: every rank makes the same
/// calls in the same order.
pub trait Collective: Send + Sync {
    /// This process's index, `0..size()`; rank 0 alone writes the run's files.
    fn rank(&self) -> usize;
    /// Processes in the run.
    fn size(&self) -> usize;
    /// `x <- x_0 + x_1 + ... + x_{size-1}` (rank `r`'s `x` is `x_r`), added left to right in rank order,
    /// so every rank holds the same bits, run after run.
    fn all_reduce_sum(&self, x: &mut [f32]);
    /// Every rank's `mine`, in rank order.
    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>>;
}

/// One process: the sum of one rank's values is those values.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _x: &mut [f32]) {}
    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// The processes of this run: those a launcher started (see [`set_world`]), or this one alone.
pub fn world() -> &'static dyn Collective {
    WORLD.get().map(|w| w.as_ref()).unwrap_or(&Single)
}

/// Makes `w` the run's world; the binary calls this once, before anything reads [`world`]. A second
/// call is refused (returns `w`).
pub fn set_world(w: Box<dyn Collective>) -> Result<(), Box<dyn Collective>> {
    WORLD.set(w)
}

/// True on the rank that writes the run's files and prints its progress (always, with one process).
pub fn is_root() -> bool {
    world().rank() == 0
}

/// True on every rank when `flag` is true on any (an interruption one rank saw first stops all at the
/// same step).
pub fn any(flag: bool) -> bool {
    let w = world();
    if w.size() == 1 {
        return flag;
    }
    w.all_gather_bytes(&[flag as u8]).iter().any(|b| b.first() == Some(&1))
}

/// A value sent between ranks as bytes (exactly: floats by their bits).
pub trait Wire: Sized {
    fn put(&self, b: &mut Vec<u8>);
    /// Reads one value that [`Wire::put`] wrote from the front of `b`, advancing it.
    fn get(b: &mut &[u8]) -> Self;
}

/// `f` of this rank's contiguous share ([`share_of`]) of `n` items, the shares gathered in rank order on
/// every rank: the whole `f(0..n)` of one process, computed in parts. An error on one rank is that rank's
/// alone (the binary then ends every rank).
pub fn gather_shares<T: Wire, E>(n: usize, f: impl FnOnce(Range<usize>) -> Result<Vec<T>, E>) -> Result<Vec<T>, E> {
    let w = world();
    if w.size() == 1 {
        return f(0..n);
    }
    let mine = f(share_of(n, w.rank(), w.size()))?;
    let mut bytes = Vec::new();
    mine.iter().for_each(|v| v.put(&mut bytes));
    let mut all = Vec::with_capacity(n);
    for part in w.all_gather_bytes(&bytes) {
        let mut rest = &part[..];
        while !rest.is_empty() {
            all.push(T::get(&mut rest));
        }
    }
    Ok(all)
}

/// True on every rank when `flag` is true on all.
pub fn all(flag: bool) -> bool {
    !any(!flag)
}

/// Returns once every rank has called it.
pub fn barrier() {
    any(false);
}

/// Sums the ranks' gradients into every rank's `grads` (tensor by tensor, in the set's order), and counts
/// the time and bytes it took in [`comm_stats`]: first the wait for the slowest rank (a barrier), then
/// the sum itself. Nothing happens with one process.
pub fn reduce_grads(grads: &mut impl ParamSet) {
    let w = world();
    if w.size() == 1 {
        return;
    }
    let t_wait = Instant::now();
    barrier();
    WAIT_NANOS.fetch_add(t_wait.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut values = 0u64;
    for (_, t) in grads.named_mut() {
        w.all_reduce_sum(&mut t.data);
        values += t.data.len() as u64;
    }
    COMM_NANOS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    COMM_BYTES.fetch_add(reduce_bytes_per_rank(values, w.size()), Ordering::Relaxed);
}

/// Bytes each rank sends (and receives) to sum `values` f32 over `ranks` as [`mpi::MpiWorld`] does: its
/// `(ranks-1)/ranks` of the values to their owners, then the owned sums to the others.
pub fn reduce_bytes_per_rank(values: u64, ranks: usize) -> u64 {
    let n = ranks as u64;
    2 * 4 * values * (n - 1) / n
}

static WAIT_NANOS: AtomicU64 = AtomicU64::new(0);
static COMM_NANOS: AtomicU64 = AtomicU64::new(0);
static COMM_BYTES: AtomicU64 = AtomicU64::new(0);

/// What the gradient sums of this process have cost since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Seconds waiting for the slowest rank to reach the sum (load imbalance, not communication).
    pub wait_s: f64,
    /// Seconds moving and adding the values once every rank was there.
    pub sum_s: f64,
    /// Bytes this rank sent (it received as many).
    pub bytes: u64,
}

pub fn comm_stats() -> CommStats {
    let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
    CommStats { wait_s: s(&WAIT_NANOS), sum_s: s(&COMM_NANOS), bytes: COMM_BYTES.load(Ordering::Relaxed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_changes_nothing() {
        let mut x = vec![1.0f32, -2.5];
        Single.all_reduce_sum(&mut x);
        assert_eq!(x, [1.0, -2.5]);
        assert_eq!(world().size(), 1);
        assert!(is_root());
        assert!(any(true) && !any(false));
        assert_eq!(reduce_bytes_per_rank(1000, 2), 4000);
    }
}
