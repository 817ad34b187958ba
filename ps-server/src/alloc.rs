//! The shard's allocator settings.
//!
//! glibc raises its mmap threshold dynamically: once a large block (an index
//! array replaced by a grown one) is freed, blocks up to that size come from
//! the heap afterwards, where freed index arrays stay resident as holes. A
//! shard allocates nothing but large, long-lived arrays, so it fixes the
//! threshold at 128 KiB: arena chunks and index arrays are mapped, and a
//! replaced index array goes back to the kernel at once. Measured at 10^7
//! rows (dim 18, f16, row-wise Adagrad): 65.4 -> 64.4 B/row of RSS
//! (BENCHMARKS.md).

/// Applies the shard's allocator settings (glibc on Linux; elsewhere a
/// no-op). Returns whether they were applied.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tunables; glibc documents
        // it as callable at any time. Setting the threshold explicitly also
        // turns off its dynamic adjustment.
        unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
