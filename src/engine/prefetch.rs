//! Software prefetch: asking the CPU to start loading a cache line that is about to be read.
//!
//! The two-phase batch prepares a group of requests (normalise, hash) before deciding any, so
//! the table slot each will read is known a whole group ahead; prefetching it then turns the
//! decisions' cache misses (a 10 M table is ~240 MB) into hits. Stable Rust has no safe
//! prefetch (`core::intrinsics::prefetch_read_data` is unstable), so this module holds the
//! second and last `unsafe` of the crate besides `snapshot::mmap`.

#![allow(unsafe_code)]

/// Hints that the cache line holding `p` will be read soon. Any address may be passed,
/// dangling or stale ones included: the hint never reads memory the program can observe,
/// it only warms a cache. A no-op on targets other than x86_64.
#[inline(always)]
pub(crate) fn read<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint with no architectural effect: it never faults, whatever the
    // address (Intel SDM vol. 2B, "PREFETCHh": prefetches of invalid or unmapped addresses
    // are dropped), reads nothing into a register and writes nothing, and LLVM's
    // `llvm.prefetch`, which the intrinsic lowers to, "does not modify the behavior of the
    // program". The intrinsic is `unsafe` only because it takes a raw pointer; the SSE it
    // needs is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_address_is_fine() {
        let v = [1u64, 2, 3];
        read(v.as_ptr());
        // Past the end, null, and an address nothing is mapped at: a hint, never a fault.
        read(v.as_ptr().wrapping_add(1 << 40));
        read(std::ptr::null::<u64>());
        read(usize::MAX as *const u8);
        assert_eq!(v, [1, 2, 3]);
    }
}
