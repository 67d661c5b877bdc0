//! The generator's own CPU time, from `/proc/self/stat` (user + system time of every thread
//! of the process, in clock ticks of 1/100 s, the kernel's fixed USER_HZ).

/// Kernel clock ticks per second in `/proc` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) this process has used so far, if the platform tells.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come state (field 3) ... utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_cpu_time() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(super::process_cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
