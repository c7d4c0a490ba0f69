//! The balancer's side: scheduled runs and instant balances — the shipped planner and instant
//! plan for allot, the baselines' own rules for the others — and the advisor at the end of
//! training.

use super::*;

impl Sim<'_> {
    /// A run's release of `units` from cell `k`, landing one latency later.
    fn send_release(&mut self, k: usize, units: u64) {
        self.metrics.transactions += 1;
        self.at(
            self.now + self.cfg.latency,
            Ev::Release {
                cell: k,
                units,
                for_cell: None,
            },
        );
    }

    /// The baselines' instant handler when the reserve is short (allot's is the real instant
    /// plan): release free units from the sites that need them least, then grant them to the
    /// asker. Returns whether any release was sent; the largest carries the answer to the asker.
    pub(super) fn reclaim(&mut self, asker: usize, short: u64, urgent: u64, answer: Reply) -> bool {
        let p = self.cells[asker].product;
        let now = self.now;
        // (spare above own needs, free, site) per reachable donor.
        let mut donors: Vec<(u64, u64, usize)> = (0..self.w.sites.len())
            .filter(|&s| s != self.cells[asker].site && self.reachable(s, now))
            .map(|s| {
                let k = s * self.np + p;
                let c = &self.cells[k];
                // A cell is never reclaimed below its configured `min_units` (0 un-tuned).
                let kept = (c.in_use + c.queued_units).max(u64::from(self.settings[k].min_units));
                let free = c.alloc.saturating_sub(kept);
                let spare = match self.kind {
                    // Sentinel lends only what keeps the lender below its own threshold.
                    Kind::Sentinel => c.alloc.saturating_sub((c.in_use * 10).div_ceil(9) + 1),
                    _ => free,
                };
                (spare, free, s)
            })
            .filter(|d| d.1 > 0)
            .collect();
        donors.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut asks = vec![0u64; self.w.sites.len()];
        let mut left = short;
        for d in &donors {
            let take = d.0.min(left);
            asks[d.2] += take;
            left -= take;
        }
        // Below the donors' own headroom only for clients waiting right now.
        let mut urgent_left = urgent.min(left);
        for d in &donors {
            let take = (d.1 - asks[d.2].min(d.1)).min(urgent_left);
            asks[d.2] += take;
            urgent_left -= take;
        }
        let asks: Vec<(usize, u64)> = asks
            .into_iter()
            .enumerate()
            .filter(|a| a.1 > 0)
            .map(|(s, units)| (self.cell(s, p), units))
            .collect();
        self.send_reclaims(asker, &asks, answer, 0)
    }

    /// Sends the releases of a reclaim for `asker` (cell, units); once each is confirmed its
    /// units are granted to the asker, and the largest carries the answer to its request.
    /// Returns whether any release was sent.
    pub(super) fn send_reclaims(
        &mut self,
        asker: usize,
        asks: &[(usize, u64)],
        answer: Reply,
        delay: u64,
    ) -> bool {
        let answer_by = asks
            .iter()
            .enumerate()
            .max_by_key(|(i, a)| (a.1, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let mut sent = false;
        for (i, &(cell, units)) in asks.iter().enumerate() {
            if units > 0 {
                self.metrics.transactions += 1;
                let reply = (Some(i) == answer_by).then_some(answer);
                self.at(
                    self.now + delay + self.cfg.latency,
                    Ev::Release {
                        cell,
                        units,
                        for_cell: Some((asker, reply)),
                    },
                );
                sent = true;
            }
        }
        sent
    }

    /// One product's scheduled run: compute targets by the policy, release, then grant.
    /// Returns the moves it sent.
    pub(super) fn scheduled(&mut self, p: usize) -> u64 {
        let now = self.now;
        let ns = self.w.sites.len();
        let live: Vec<usize> = (0..ns).filter(|&s| self.reachable(s, now)).collect();
        let ks: Vec<usize> = live.iter().map(|&s| self.cell(s, p)).collect();
        let pool: u64 =
            self.books[p].reserve + ks.iter().map(|&k| self.cells[k].alloc).sum::<u64>();
        let targets: Vec<u64> = match self.kind {
            Kind::Sms { .. } => {
                let base: Vec<u64> = ks
                    .iter()
                    .map(|&k| {
                        let c = &self.cells[k];
                        c.in_use + c.in_use.div_ceil(10).max(1)
                    })
                    .collect();
                let total: u64 = base.iter().sum();
                let weights: Vec<f64> = base.iter().map(|&b| b as f64).collect();
                if total <= pool {
                    let extra = apportion(pool - total, &weights);
                    base.iter().zip(extra).map(|(b, e)| b + e).collect()
                } else {
                    apportion(pool, &weights)
                }
            }
            Kind::Doorman { fair, .. } => {
                let wants: Vec<u64> = ks
                    .iter()
                    .map(|&k| {
                        let c = &self.cells[k];
                        // What a client would sensibly ask for: its peak, the demand it
                        // turned away, and the same 10 % (at least one unit) spare as SMS.
                        c.in_use.max(c.peak) + c.denials + c.in_use.div_ceil(10).max(1)
                    })
                    .collect();
                if fair {
                    water_fill(pool, &wants)
                } else {
                    doorman_proportional(pool, &wants)
                }
            }
            Kind::Allot { instant, .. } => {
                let moves = self.plan_allot(p, &ks, instant);
                for &k in &ks {
                    if let Some(r) = &mut self.recorder {
                        let c = &self.cells[k];
                        let counts = SampleCounts {
                            allocation: c.alloc,
                            in_use: c.in_use,
                            peak_in_use: c.peak.max(c.in_use),
                            denials: c.denials,
                            waiting: c.queued_units,
                            instant_requests: c.instant_units,
                        };
                        r.sample(self.w, now, c.site, p, counts);
                    }
                    let c = &mut self.cells[k];
                    c.peak = c.in_use;
                    c.denials = 0;
                    c.instant_units = 0;
                    c.instant_count = 0;
                }
                return moves;
            }
            _ => return 0,
        };
        let mut moves = 0;
        let mut grants = Vec::new();
        for (&k, &t) in ks.iter().zip(&targets) {
            let c = &mut self.cells[k];
            if t < c.alloc {
                let units = c.alloc - t;
                moves += 1;
                self.send_release(k, units);
            } else if t > c.alloc {
                grants.push((k, t - c.alloc));
            }
            let c = &mut self.cells[k];
            c.peak = c.in_use;
            c.denials = 0;
        }
        moves += grants.len() as u64;
        if !grants.is_empty() {
            self.at(
                now + 2 * self.cfg.latency,
                Ev::RunGrants { product: p, grants },
            );
        }
        moves
    }

    /// The balancer's view of one reachable cell at a run: what its status reports, the
    /// signals of its recorded samples, its configured min and buffer, whether it is held —
    /// the same inputs `build_snapshot` gives the planner. Records the run's sample first, as
    /// the balancer records a run's samples before it reads the signals.
    pub(super) fn run_view(&mut self, k: usize) -> CellSnapshot {
        let now = self.now;
        self.record_in_use(k);
        let set = self.settings[k];
        let c = &mut self.cells[k];
        c.samples.push_back(PeakSample {
            at: now,
            peak: c.peak,
        });
        while c.samples.front().is_some_and(|s| s.at + HISTORY < now) {
            c.samples.pop_front();
        }
        let demand = Demand {
            peak_in_use: c.peak,
            denials: c.denials,
            waiting: c.queued_units,
            instant_requests: c.instant_count,
            signals: signals(c.samples.make_contiguous(), now, &self.cfg.signals),
        };
        c.seen = (demand, c.in_use);
        CellSnapshot {
            server: c.site as u32,
            allocation: c.alloc,
            in_use: c.in_use,
            min_units: u64::from(set.min_units),
            buffer_units: u64::from(set.buffer_units),
            draining: false,
            recently_granted: c.granted_at.is_some_and(|t| t + self.cfg.hold > now),
            demand,
        }
    }

    /// The planner's configuration for this policy: the shipped defaults, with instant
    /// balancing as the policy has it.
    pub(super) fn planner_config(&self) -> PlannerConfig {
        let instant = matches!(self.kind, Kind::Allot { instant: true, .. });
        PlannerConfig {
            instant_balancing: instant,
            ..self.cfg.planner
        }
    }

    /// allot's scheduled run of one product: the balancer's snapshot → the real planner → its
    /// moves, releases first (returned: how many were sent). Units of unreachable sites are set
    /// aside, and a product with units in transit is skipped, as the balancer does.
    pub(super) fn plan_allot(&mut self, p: usize, live: &[usize], _instant: bool) -> u64 {
        let now = self.now;
        let mut cells = Vec::with_capacity(live.len());
        for &k in live {
            cells.push(self.run_view(k));
        }
        if self.books[p].in_transit > 0 {
            return 0;
        }
        let set_aside: u64 = (0..self.w.sites.len())
            .map(|s| self.cell(s, p))
            .filter(|k| !live.contains(k))
            .map(|k| self.cells[k].alloc)
            .sum();
        let snapshot = ProductSnapshot {
            product: p as u32,
            purchased: self.books[p].purchased - set_aside,
            reserve: self.books[p].reserve,
            in_transit: 0,
            cells,
        };
        let plan = match plan_product(&snapshot, &self.planner_config()) {
            Ok(plan) => plan,
            Err(_) => {
                self.metrics.violations.conservation += 1;
                return 0;
            }
        };
        let moves = plan.moves.len() as u64;
        let mut grants = Vec::new();
        for m in plan.moves {
            let k = self.cell(m.server() as usize, p);
            match m {
                Move::Release { units, .. } => self.send_release(k, units),
                Move::Grant { units, .. } => grants.push((k, units)),
            }
        }
        if !grants.is_empty() {
            self.at(
                now + 2 * self.cfg.latency,
                Ev::RunGrants { product: p, grants },
            );
        }
        moves
    }

    /// The balancer's instant handler for allot: the real instant plan over the books now and
    /// what the last run saw of each reachable cell (the balancer's memory), `deficit` of the
    /// `units` asked being urgent.
    pub(super) fn plan_instant(
        &self,
        asker: usize,
        units: u64,
        deficit: u64,
        fresh: bool,
    ) -> allot_core::instant::InstantPlan {
        let now = self.now;
        let p = self.cells[asker].product;
        let cells: Vec<CellSnapshot> = (0..self.w.sites.len())
            .filter(|&s| s == self.cells[asker].site || self.reachable(s, now))
            .map(|s| {
                let k = self.cell(s, p);
                let c = &self.cells[k];
                let set = self.settings[k];
                CellSnapshot {
                    server: s as u32,
                    allocation: c.alloc,
                    in_use: if fresh {
                        c.in_use
                    } else {
                        c.seen.1.min(c.alloc)
                    },
                    min_units: u64::from(set.min_units),
                    buffer_units: u64::from(set.buffer_units),
                    draining: false,
                    recently_granted: c.granted_at.is_some_and(|t| t + self.cfg.hold > now),
                    demand: if fresh {
                        Demand {
                            waiting: c.queued_units,
                            ..c.seen.0
                        }
                    } else {
                        c.seen.0
                    },
                }
            })
            .collect();
        let urgent = deficit.min(units);
        plan_instant(
            self.books[p].reserve,
            &cells,
            &InstantAsk {
                asker: self.cells[asker].site as u32,
                urgent,
                topup: units - urgent,
            },
            &self.planner_config(),
        )
    }

    /// The end of the training period of an advised policy: the real advisor reads the
    /// recorded history, and its schedule and cell settings replace the current ones.
    pub(super) fn advise(&mut self) {
        let Some(history) = self.recorder.take() else {
            return;
        };
        let Kind::Allot { interval, .. } = self.kind else {
            return;
        };
        let input = advisor_input(self.w, &history, interval, &self.settings, self.now);
        drop(history);
        let advice = advise(&input);
        let tuned = Tuned::from_advice(self.w, &advice, &self.settings, self.now, self.w.duration);
        self.settings = tuned.settings;
        if let Some(runs) = tuned.runs {
            self.generation += 1;
            let mut runs: VecDeque<u64> = runs.into();
            if let Some(first) = runs.pop_front() {
                let generation = self.generation;
                self.at(first, Ev::Scheduled { generation });
            }
            self.cron_runs = Some(runs);
        }
        self.metrics.advice = Some(advice);
    }

    /// Time series, the step metric and the fairness reference.
    pub(super) fn sample(&mut self) {
        let now = self.now;
        let ns = self.w.sites.len();
        let k0 = self.metrics.plotted_product;
        let row: Vec<u64> = (0..ns)
            .map(|s| self.cells[s * self.np + k0].alloc)
            .collect();
        let used: Vec<u64> = (0..ns)
            .map(|s| self.cells[s * self.np + k0].in_use)
            .collect();
        self.metrics.alloc_series.push((now, row, used));
        if let Some(step) = self.w.step
            && now >= step.at
            && self.metrics.step_time.is_none()
        {
            let held: u64 = (0..self.np)
                .map(|p| self.cells[self.cell(step.to_site as usize, p)].alloc)
                .sum();
            if held as f64 >= 0.95 * step.new_level {
                self.metrics.step_time = Some(now - step.at);
            }
        }
        for p in 0..self.np {
            let demand: Vec<u64> = (0..ns)
                .map(|s| {
                    let c = &self.cells[s * self.np + p];
                    c.in_use + c.queued_units + c.sample_denials
                })
                .collect();
            let purchased = self.books[p].purchased;
            if demand.iter().sum::<u64>() > purchased && purchased > 0 {
                let fair = water_fill(purchased, &demand);
                let gap: u64 = (0..ns)
                    .map(|s| fair[s].saturating_sub(self.cells[s * self.np + p].alloc))
                    .sum();
                self.metrics.fairness_gap_sum += gap as f64 / purchased as f64;
                self.metrics.fairness_samples += 1;
            }
            for s in 0..ns {
                self.cells[s * self.np + p].sample_denials = 0;
            }
        }
    }
}

/// Doorman's ProportionalShare: everyone gets its want if all fit; otherwise an equal share
/// capped by its want, and the rest in proportion to what each still wants.
pub fn doorman_proportional(capacity: u64, wants: &[u64]) -> Vec<u64> {
    let total: u64 = wants.iter().sum();
    if total <= capacity || wants.is_empty() {
        return wants.to_vec();
    }
    let equal = capacity / wants.len() as u64;
    let mut out: Vec<u64> = wants.iter().map(|&w| w.min(equal)).collect();
    let left = capacity - out.iter().sum::<u64>();
    let extra: Vec<f64> = wants
        .iter()
        .zip(&out)
        .map(|(&w, &o)| (w - o) as f64)
        .collect();
    for (o, e) in out.iter_mut().zip(apportion(left, &extra)) {
        *o += e;
    }
    out
}
