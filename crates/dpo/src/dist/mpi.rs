//! The world of processes that `mpirun` (OpenMPI, MPICH) or Slurm's `srun` started, over MPI (rsmpi).
//!
//! The gradient sum is deterministic and the same on every rank, which `MPI_Allreduce` does not promise
//! (its algorithm, hence the order of the additions, may differ by message size, rank count and rank):
//! each rank owns a contiguous slice of the values, receives every rank's copy of it (`MPI_Alltoallv`),
//! adds the copies in rank order, and the owned sums are gathered back to every rank
//! (`MPI_Allgatherv`). Each rank sends and receives `2 (n-1)/n` of the buffer, as a ring all-reduce does.

use std::sync::Mutex;

use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;
use mpi::Threading;

use super::{share_of, Collective};

/// Environment variables a launcher sets in every process it starts (OpenMPI's `mpirun`, PMIx under
/// Slurm's `srun --mpi=pmix`, MPICH's Hydra).
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"];

/// True when a launcher started this process.
pub fn launched() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// MPI for this process: holds MPI initialised while it lives (dropping it finalises MPI).
pub struct MpiGuard {
    _universe: Universe,
    world: SimpleCommunicator,
}

impl MpiGuard {
    /// Ends every rank of the run with `code` (after this rank reported an error the others cannot
    /// know of, so that none waits for it forever).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// Initialises MPI when a launcher started this process and makes its world [`super::world`]; `None`
/// (one process) otherwise, or when MPI would not initialise.
pub fn init() -> Option<MpiGuard> {
    if !launched() {
        return None;
    }
    // Calls come from one thread at a time (the training loop's; the math's threads never call MPI).
    let (universe, _) = mpi::initialize_with_threading(Threading::Serialized)?;
    let world = universe.world();
    let installed = MpiWorld { comm: Mutex::new(Comm(universe.world())) };
    if super::set_world(Box::new(installed)).is_err() {
        return None;
    }
    Some(MpiGuard { _universe: universe, world })
}

/// The world communicator, used by one thread at a time.
struct Comm(SimpleCommunicator);

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, which lets any thread call it as long as no two
// calls overlap; `MpiWorld` reaches the communicator only through its mutex.
unsafe impl Send for Comm {}

/// The processes of an MPI launch.
pub struct MpiWorld {
    comm: Mutex<Comm>,
}

impl MpiWorld {
    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        f(&guard.0)
    }
}

/// Values summed per collective call: MPI counts are 32-bit.
const MAX_CHUNK: usize = 1 << 28;

fn counts(len: usize, size: usize) -> (Vec<i32>, Vec<i32>) {
    (0..size).map(|r| share_of(len, r, size)).map(|s| (s.len() as i32, s.start as i32)).unzip()
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.with(|c| c.rank() as usize)
    }

    fn size(&self) -> usize {
        self.with(|c| c.size() as usize)
    }

    fn all_reduce_sum(&self, x: &mut [f32]) {
        self.with(|c| {
            let (rank, size) = (c.rank() as usize, c.size() as usize);
            for x in x.chunks_mut(MAX_CHUNK) {
                let (cnt, displ) = counts(x.len(), size);
                let own = cnt[rank] as usize;
                // [size, own]: every rank's copy of the slice this rank owns, in rank order.
                let mut copies = vec![0f32; own * size];
                let recv_displ: Vec<i32> = (0..size).map(|r| (r * own) as i32).collect();
                c.all_to_all_varcount_into(
                    &Partition::new(&*x, &cnt[..], &displ[..]),
                    &mut PartitionMut::new(&mut copies[..], vec![own as i32; size], recv_displ),
                );
                let (sum, rest) = copies.split_at_mut(own);
                for copy in rest.chunks_exact(own.max(1)) {
                    sum.iter_mut().zip(copy).for_each(|(s, v)| *s += v);
                }
                c.all_gather_varcount_into(&*sum, &mut PartitionMut::new(x, &cnt[..], &displ[..]));
            }
        })
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        self.with(|c| {
            let size = c.size() as usize;
            let mut lens = vec![0i32; size];
            c.all_gather_into(&(mine.len() as i32), &mut lens[..]);
            let displ: Vec<i32> = lens.iter().scan(0, |acc, &l| Some(std::mem::replace(acc, *acc + l))).collect();
            let mut all = vec![0u8; lens.iter().map(|&l| l as usize).sum()];
            c.all_gather_varcount_into(mine, &mut PartitionMut::new(&mut all[..], &lens[..], &displ[..]));
            lens.iter().zip(&displ).map(|(&l, &d)| all[d as usize..(d + l) as usize].to_vec()).collect()
        })
    }
}
