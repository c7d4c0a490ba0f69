//! The metering servers: checkouts served from the local allocation, the wait queue, the
//! trigger's instant requests (the real `allot_core::trigger` for allot).

use super::*;

impl Sim<'_> {
    pub(super) fn record_in_use(&mut self, k: usize) {
        let c = &mut self.cells[k];
        c.peak = c.peak.max(c.in_use);
    }

    pub(super) fn checkout(&mut self, a: &Arrival) {
        let (s, p) = (a.site as usize, a.product as usize);
        let k = self.cell(s, p);
        let u = u64::from(a.units);
        self.metrics.asked(a);
        if self.down_until[s] > self.now {
            self.deny(k, u, a.hold, a.at);
            return;
        }
        let c = &self.cells[k];
        if c.queue.is_empty() && c.alloc.saturating_sub(c.in_use) >= u {
            self.grant_checkout(k, u, a.hold);
        } else {
            match self.kind {
                Kind::Allot { instant: true, .. } => {
                    self.next_id += 1;
                    let id = self.next_id;
                    let c = &mut self.cells[k];
                    c.queue.push_back(Pending {
                        id,
                        units: u,
                        hold: a.hold,
                        arrived: a.at,
                    });
                    c.queued_units += u;
                    self.at(
                        self.now + self.cfg.hold_bound,
                        Ev::HoldExpire { cell: k, id },
                    );
                }
                Kind::InstantOnly => {
                    self.deny(k, u, a.hold, a.at);
                    if self.cells[k].in_flight_since.is_none() {
                        self.send_instant(k, u, u);
                    }
                }
                _ => self.deny(k, u, a.hold, a.at),
            }
        }
        self.after_change(k);
    }

    /// Calls the policy's agent-side hook after anything changed at a cell.
    pub(super) fn after_change(&mut self, k: usize) {
        let now = self.now;
        match self.kind {
            Kind::Allot { instant: true, .. } => {
                let c = &self.cells[k];
                let mut state = TriggerState {
                    now,
                    allocation: c.alloc,
                    in_use: c.in_use,
                    short_units: c.queued_units,
                    in_flight_since: c.in_flight_since,
                    in_flight_urgent: c.in_flight_urgent,
                    in_flight_urgent_units: c.urgent_in_flight,
                    short_answer_at: c.short_answer_at,
                    urgent_short_at: c.urgent_short_at,
                };
                if let Some(pull) = instant_request(&state, &self.cfg.trigger) {
                    self.send_instant(k, pull.units, pull.urgent);
                    let c = &self.cells[k];
                    state.in_flight_since = c.in_flight_since;
                    state.in_flight_urgent = c.in_flight_urgent;
                    state.in_flight_urgent_units = c.urgent_in_flight;
                }
                // As the metering server's timer task: re-evaluate when time alone can change
                // the decision.
                if let Some(at) = next_check_at(&state, &self.cfg.trigger) {
                    let c = &mut self.cells[k];
                    if c.recheck_at.is_none_or(|t| at < t || t <= now) {
                        c.recheck_at = Some(at);
                        self.at(at, Ev::Recheck { cell: k });
                    }
                }
            }
            Kind::Sentinel => {
                let c = &self.cells[k];
                let timed_out = c
                    .in_flight_since
                    .is_some_and(|t| now >= t + self.cfg.trigger.in_flight_timeout_ms);
                let backing_off = c
                    .short_answer_at
                    .is_some_and(|t| now < t + self.cfg.trigger.backoff_ms);
                if (c.in_flight_since.is_none() || timed_out)
                    && !backing_off
                    && c.in_use > 0
                    && c.in_use * 10 >= c.alloc * 9
                {
                    let units = c.alloc.div_ceil(10).max(1);
                    self.send_instant(k, units, 0);
                }
            }
            Kind::InstantOnly => {
                let c = &mut self.cells[k];
                if c.in_flight_since
                    .is_some_and(|t| now >= t + self.cfg.trigger.in_flight_timeout_ms)
                {
                    c.in_flight_since = None;
                }
            }
            _ => {}
        }
    }

    pub(super) fn grant_checkout(&mut self, k: usize, units: u64, hold: u64) {
        let c = &mut self.cells[k];
        c.in_use += units;
        let epoch = c.epoch;
        self.record_in_use(k);
        self.at(
            self.now + hold,
            Ev::Depart {
                cell: k,
                units,
                epoch,
            },
        );
    }

    pub(super) fn deny(&mut self, k: usize, units: u64, hold: u64, arrived: u64) {
        let (s, p) = (self.cells[k].site, self.cells[k].product);
        let mut anywhere = self.books[p].reserve;
        let mut reachable = if self.reachable(s, self.now) {
            self.books[p].reserve
        } else {
            0
        };
        let own_reachable = self.reachable(s, self.now);
        for o in 0..self.w.sites.len() {
            if o == s {
                continue;
            }
            let c = &self.cells[o * self.np + p];
            let free = c.alloc.saturating_sub(c.in_use);
            anywhere += free;
            if own_reachable && self.reachable(o, self.now) {
                reachable += free;
            }
        }
        let c = &mut self.cells[k];
        c.denials += units;
        c.sample_denials += units;
        let a = Arrival {
            at: arrived,
            site: s as u16,
            product: p as u16,
            units: units as u32,
            hold,
        };
        self.metrics
            .denied(&a, anywhere >= units, reachable >= units);
    }

    /// Grants queued checkouts in FIFO order while units are free.
    pub(super) fn serve_queue(&mut self, k: usize) {
        loop {
            let c = &mut self.cells[k];
            let Some(&head) = c.queue.front() else { break };
            if c.alloc.saturating_sub(c.in_use) < head.units {
                break;
            }
            c.queue.pop_front();
            c.queued_units -= head.units;
            self.metrics.waited(head.arrived, self.now - head.arrived);
            self.grant_checkout(k, head.units, head.hold);
        }
    }

    pub(super) fn send_instant(&mut self, k: usize, units: u64, deficit: u64) {
        let now = self.now;
        let site = self.cells[k].site;
        let c = &mut self.cells[k];
        c.in_flight_since = Some(now);
        c.in_flight_urgent = deficit > 0;
        c.urgent_in_flight += deficit;
        c.requests_in_flight += 1;
        c.instant_units += units;
        c.instant_count += 1;
        self.metrics.transactions += 1;
        self.metrics.instant_requests += 1;
        if self.reachable(site, now) {
            self.at(
                now + self.cfg.latency,
                Ev::InstantAtBalancer {
                    cell: k,
                    units,
                    deficit,
                },
            );
        } else {
            self.lost_request(k, units, deficit);
        }
    }

    /// A request that never reaches the balancer: the metering server's call fails after its
    /// timeout, an answer of none.
    pub(super) fn lost_request(&mut self, k: usize, units: u64, deficit: u64) {
        self.at(
            self.now + self.cfg.trigger.in_flight_timeout_ms,
            Ev::Grant {
                cell: k,
                units: 0,
                reply: Some((units, deficit.min(units), 0)),
            },
        );
    }
}
