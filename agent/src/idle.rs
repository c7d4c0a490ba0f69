//! How idle a wrapped program is, for the product's idle rules (`idle_notify_seconds`,
//! `idle_revoke_seconds`): `allot-agent run` samples the CPU time of the command's whole
//! process tree and reports, with each heartbeat, how long it has used none.
//!
//! [`IdleClock`] is the arithmetic (pure, tested); [`tree_cpu_ticks`] reads Linux's `/proc`.

use std::time::Duration;

/// Counts idle time from successive samples of a cumulative CPU counter.
#[derive(Debug, Clone, Default)]
pub struct IdleClock {
    last: Option<u64>,
    idle: Duration,
}

impl IdleClock {
    /// Takes a sample `elapsed` after the previous one: idle time grows while the counter
    /// stands still and restarts at zero as soon as it moves (or the tree cannot be read).
    pub fn observe(&mut self, ticks: Option<u64>, elapsed: Duration) -> u32 {
        match (self.last, ticks) {
            (Some(before), Some(now)) if now == before => self.idle += elapsed,
            _ => self.idle = Duration::ZERO,
        }
        self.last = ticks;
        u32::try_from(self.idle.as_secs()).unwrap_or(u32::MAX)
    }
}

/// User plus system CPU time, in clock ticks, of `root` and every process descended from it,
/// read from `/proc`; `None` when `root` is gone or `/proc` cannot be read.
pub fn tree_cpu_ticks(root: u32) -> Option<u64> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, ticks)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            procs.push((pid, ppid, ticks));
        }
    }
    if !procs.iter().any(|p| p.0 == root) {
        return None;
    }
    let mut tree = vec![root];
    let mut total = 0u64;
    while let Some(pid) = tree.pop() {
        for &(child, ppid, ticks) in &procs {
            if child == pid {
                total = total.saturating_add(ticks);
            }
            if ppid == pid && child != pid {
                tree.push(child);
            }
        }
    }
    Some(total)
}

/// The parent pid and utime + stime of a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) … utime(14) stime(15), i.e. indexes 0, 1, 11, 12.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_grows_while_the_counter_stands_and_restarts_when_it_moves() {
        let mut c = IdleClock::default();
        let s = Duration::from_secs(30);
        assert_eq!(c.observe(Some(5), s), 0);
        assert_eq!(c.observe(Some(5), s), 30);
        assert_eq!(c.observe(Some(5), s), 60);
        assert_eq!(c.observe(Some(6), s), 0);
        assert_eq!(c.observe(Some(6), s), 30);
        assert_eq!(c.observe(None, s), 0);
    }

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "42 (a (weird) name) S 7 42 42 0 -1 4194560 1 0 0 0 11 22 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(line), Some((7, 33)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_tree_is_readable_and_a_missing_one_is_not() {
        assert!(tree_cpu_ticks(std::process::id()).is_some());
        assert_eq!(tree_cpu_ticks(u32::MAX), None);
    }
}
