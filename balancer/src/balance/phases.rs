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

    /// Adds `other`'s laps to this one's of the same name (new names at the end): the parts
    /// of a phase that runs once per product, summed over the products (work done
    /// concurrently is counted once per product, so the sum may exceed the phase).
    pub(super) fn absorb(&mut self, other: &Phases) {
        for (name, took) in &other.laps {
            match self.laps.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += *took,
                None => self.laps.push((name, *took)),
            }
        }
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

    #[test]
    fn absorbed_laps_are_summed_by_name() {
        let mut product = Phases::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        product.lap("read");
        product.lap("plan");
        let mut totals = Phases::start();
        totals.absorb(&product);
        totals.absorb(&product);
        let read = |p: &Phases| p.laps.iter().find(|(n, _)| *n == "read").expect("read").1;
        assert_eq!(read(&totals), read(&product) * 2);
        let names: Vec<&str> = totals.laps.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["read", "plan"]);
    }
}
