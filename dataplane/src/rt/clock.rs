//! Coarse clocks for the request path: the time at the kernel's last tick (1-4 ms ago), read
//! from the vDSO without reading the CPU's time-stamp counter.
//!
//! A request used to read the clock about ten times. Several of those only need seconds or
//! milliseconds: a key's expiry, budget periods and rate-limit windows (Unix seconds), cooldowns
//! and scrape ages (milliseconds), the pooled connections' idle times, the `Date` header. Each
//! precise read cost 25-50 ns here (2.3 % of the data plane's CPU at c=64 in `perf`), a coarse one
//! a few. Latencies (the metrics' histograms, latency-based routing) keep `std::time::Instant`.
//!
//! Off Linux these fall back to the precise clocks.

/// Seconds since the Unix epoch (0 for a clock set before 1970).
#[inline]
pub(crate) fn unix_secs() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::time::{ClockId, clock_gettime};
        u64::try_from(clock_gettime(ClockId::RealtimeCoarse).tv_sec).unwrap_or(0)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// Milliseconds on a monotonic clock (never 0). Only differences between two readings mean
/// anything.
#[inline]
pub(crate) fn mono_ms() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::time::{ClockId, clock_gettime};
        let t = clock_gettime(ClockId::MonotonicCoarse);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let millis = u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000;
        secs * 1000 + millis + 1
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let base = BASE.get_or_init(std::time::Instant::now);
        base.elapsed().as_millis() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_agree_with_the_precise_ones() {
        let precise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let coarse = unix_secs();
        assert!(coarse.abs_diff(precise) <= 1, "{coarse} vs {precise}");

        let (a, start) = (mono_ms(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (b, took) = (mono_ms(), start.elapsed().as_millis() as u64);
        assert!(a > 0 && b >= a);
        // Each reading may lag by up to a tick (at most 10 ms at HZ=100).
        assert!(b - a + 10 >= took && b - a <= took + 10, "{a} {b} {took}");
    }
}
