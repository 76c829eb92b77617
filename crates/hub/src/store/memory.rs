//! Handing freed heap memory back to the kernel after the store's big,
//! short-lived allocations.
//!
//! A snapshot encodes the whole state into one buffer and writes it in one
//! redb transaction; a purge then rewrites most of the log table. Tens of
//! MiB are allocated and freed while the state keeps growing around them,
//! so glibc's heap cannot shrink from the top and the node's RSS stayed
//! about 55 MiB higher after its first snapshot (`hub-vs-etcd`, 16
//! clients). `malloc_trim` also releases free pages inside the heap. A
//! snapshot that a peer did not take is the same kind of burst (the whole
//! state, copied into the request and encoded), so the Raft network trims
//! after one too.

/// Returns free heap pages to the kernel on the blocking pool: a trim walks
/// the whole heap (milliseconds on a large one), which must not stall a
/// runtime worker. Call from within the runtime.
pub(crate) fn release_free_heap_soon() {
    drop(tokio::task::spawn_blocking(release_free_heap));
}

/// Returns free heap pages to the kernel (glibc only; elsewhere nothing).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_heap() {
    // SAFETY: malloc_trim(3) takes no pointers and only touches the
    // allocator's own free lists under the allocator's locks; it is safe to
    // call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns free heap pages to the kernel (glibc only; elsewhere nothing).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}
