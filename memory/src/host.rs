//! Facts about the host read at run time.

use std::sync::OnceLock;

/// The host's page size in bytes (4 KiB on x86_64, usually 64 KiB on ppc64le), read once
/// with `sysconf(_SC_PAGESIZE)`. Nothing in rangevm may assume 4096 where it means this.
pub fn host_page_size() -> u64 {
    static PAGE_SIZE: OnceLock<u64> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf takes no pointers and only reads a process-wide constant.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // POSIX requires _SC_PAGESIZE to be supported; a failure (-1) or a value that is
        // not a power of two would mean a broken libc, so fall back to the smallest page
        // size Linux has on any architecture we run on.
        u64::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_is_a_power_of_two_of_at_least_4k() {
        let size = host_page_size();
        assert!(size.is_power_of_two());
        assert!(size >= 4096);
        assert_eq!(size, host_page_size());
        // scripts/test.sh runs the ppc64le tests with 64 KiB pages and says so here, so
        // that a setup that silently fell back to 4 KiB pages fails.
        if let Ok(expect) = std::env::var("RANGEVM_EXPECT_PAGE_SIZE") {
            assert_eq!(size.to_string(), expect);
        }
    }
}
