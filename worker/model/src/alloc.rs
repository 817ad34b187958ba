//! Allocator tuning for training processes.
//!
//! candle allocates a fresh buffer for every intermediate tensor. With glibc's
//! defaults, buffers above the (dynamic) mmap threshold are mapped and unmapped
//! on every step, and freed heap tops are trimmed back to the OS, so each step
//! pays page faults and page clearing for its multi-megabyte activations
//! (15-20% of a DIN step in `perf`, and ~2.4x of a BaseModel step).
//! [`tune_allocator`] keeps such memory in the process instead. Call it once at
//! start-up, before spawning threads. The same effect is available without
//! code through the environment: `MALLOC_MMAP_THRESHOLD_=4294967296
//! MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456`.

/// Raises glibc's mmap and trim thresholds so that large tensor buffers are
/// reused rather than returned to the OS each step. Returns whether the
/// settings were applied (false on non-glibc targets).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tunables; glibc documents it
        // as callable at any time. The maximum mmap threshold is
        // HEAP_MAX / 2 (32 MiB on 64-bit); larger requests still map.
        unsafe {
            let a = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
            let b = mallopt(M_TRIM_THRESHOLD, i32::MAX);
            let c = mallopt(M_TOP_PAD, 256 * 1024 * 1024);
            a == 1 && b == 1 && c == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
