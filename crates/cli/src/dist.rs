//! The processes of a data-parallel launch (`mpirun -np N dpo ...`, `srun dpo ...`; cargo feature
//! `mpi`): MPI is initialised before anything else and finalised at the end; ranks other than 0 print
//! nothing but their errors (rank 0 prints the run's progress and results); an error on any rank ends
//! every rank, so that none waits for it forever.

#[cfg(feature = "mpi")]
mod imp {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::process::ExitCode;

    pub struct Launch {
        guard: Option<dpo::dist::mpi::MpiGuard>,
        /// Standard error as it was, on a quietened rank.
        stderr: Option<File>,
    }

    pub fn start() -> Launch {
        let guard = dpo::dist::mpi::init();
        let mut stderr = None;
        if guard.is_some() && !dpo::dist::is_root() {
            // SAFETY: dup/dup2 on the process's own standard descriptors; nothing else holds them yet.
            unsafe {
                let saved = libc::dup(2);
                if let Ok(null) = File::options().write(true).open("/dev/null") {
                    if saved >= 0 {
                        stderr = Some(File::from_raw_fd(saved));
                        libc::dup2(null.as_raw_fd(), 1);
                        libc::dup2(null.as_raw_fd(), 2);
                    }
                }
            }
        }
        Launch { guard, stderr }
    }

    impl Launch {
        /// The process's exit status: `code` on rank 0; 0 on the others once their command returned (an
        /// interrupted run's 130 from a rank that ended before rank 0 wrote its checkpoint would make
        /// `mpirun` kill rank 0 in the middle of it).
        pub fn exit_code(&self, code: ExitCode) -> ExitCode {
            if self.guard.is_some() && !dpo::dist::is_root() {
                return ExitCode::SUCCESS;
            }
            code
        }

        /// Prints `msg` (an error) as the single process would, naming the rank on the others, and ends
        /// every rank of a launch.
        pub fn fail(&mut self, msg: &str) {
            match &mut self.stderr {
                Some(f) => {
                    let _ = writeln!(f, "error (rank {}): {msg}", dpo::dist::world().rank());
                }
                None => eprintln!("error: {msg}"),
            }
            if let Some(g) = &self.guard {
                if dpo::dist::world().size() > 1 {
                    g.abort(1);
                }
            }
        }
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    use std::process::ExitCode;

    /// One process: nothing to start.
    pub struct Launch;

    pub fn start() -> Launch {
        Launch
    }

    impl Launch {
        pub fn exit_code(&self, code: ExitCode) -> ExitCode {
            code
        }

        pub fn fail(&mut self, msg: &str) {
            eprintln!("error: {msg}");
        }
    }
}

pub use imp::start;
