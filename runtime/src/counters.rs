//! Work counters: how often this thread generated kernel source, compiled
//! with NVRTC, read the disk cache, loaded a module onto a GPU or prepared a
//! CPU plan. "Compile once, call many" is tested with them: a `Mixer` does
//! each at most once in `new`, and `forward` does none of them.
//!
//! The counters are per thread (the thread that called `Mixer::new` or
//! `forward` does this work itself), so tests running in parallel do not
//! see each other's work.

use std::cell::Cell;

/// A snapshot of this thread's counters; subtract two to get the work done
/// between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// CUDA source generations (`mixc_codegen::generate`).
    pub generations: u64,
    /// NVRTC compilations actually run (not disk-cache hits).
    pub compilations: u64,
    /// Compiled modules read from the disk cache.
    pub disk_cache_reads: u64,
    /// Modules loaded onto a GPU (or into the host twin in tests).
    pub module_loads: u64,
    /// CPU plans prepared from a spec (per-head expression programs, path).
    pub cpu_plans: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            generations: self.generations - o.generations,
            compilations: self.compilations - o.compilations,
            disk_cache_reads: self.disk_cache_reads - o.disk_cache_reads,
            module_loads: self.module_loads - o.module_loads,
            cpu_plans: self.cpu_plans - o.cpu_plans,
        }
    }
}

thread_local! {
    static COUNTERS: Cell<Counters> = const { Cell::new(Counters {
        generations: 0,
        compilations: 0,
        disk_cache_reads: 0,
        module_loads: 0,
        cpu_plans: 0,
    }) };
}

/// This thread's counters now (generations come from `mixc_codegen`).
pub fn snapshot() -> Counters {
    let mut c = COUNTERS.with(Cell::get);
    c.generations = mixc_codegen::generations();
    c
}

/// What [`bump`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    Compilation,
    DiskCacheRead,
    ModuleLoad,
    CpuPlan,
}

/// Counts one piece of work on this thread.
pub(crate) fn bump(work: Work) {
    COUNTERS.with(|c| {
        let mut v = c.get();
        match work {
            Work::Compilation => v.compilations += 1,
            Work::DiskCacheRead => v.disk_cache_reads += 1,
            Work::ModuleLoad => v.module_loads += 1,
            Work::CpuPlan => v.cpu_plans += 1,
        }
        c.set(v);
    });
}
