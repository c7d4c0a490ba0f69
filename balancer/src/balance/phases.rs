//! How long each phase of a run or an instant balance took, for its closing log line: where a
//! slow one's time went, without a profiler.

/// Laps of named phases, each ended by [`Phases::lap`]; displayed as `name=1.2ms …`.
pub(super) struct Phases {
    lap_started: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    /// Starts the first phase now.
    pub(super) fn start() -> Self {
        Self {
            lap_started: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the phase `name` now and starts the next.
    pub(super) fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((name, now - self.lap_started));
        self.lap_started = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={:.1}ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Phases;

    #[test]
    fn laps_are_shown_in_order_in_milliseconds() {
        let mut phases = Phases::start();
        phases.lap("first");
        std::thread::sleep(std::time::Duration::from_millis(3));
        phases.lap("second");
        let shown = phases.to_string();
        let (first, second) = shown.split_once(' ').expect("two laps");
        assert!(
            first.starts_with("first=") && first.ends_with("ms"),
            "{shown}"
        );
        let second: f64 = second
            .strip_prefix("second=")
            .and_then(|v| v.strip_suffix("ms"))
            .and_then(|v| v.parse().ok())
            .expect("second lap in ms");
        assert!(second >= 3.0, "{shown}");
    }
}
