//! What each event does where it lands: departures, hold expiries, instant requests at the
//! balancer, grants and releases at the sites, scheduled runs, crashes; and the ping-pong count.

use super::*;

impl Sim<'_> {
    pub(super) fn event(&mut self, ev: Ev) {
        let lat = self.cfg.latency;
        match ev {
            Ev::Depart { cell, units, epoch } => {
                if self.cells[cell].epoch != epoch {
                    return; // lost in a crash
                }
                self.cells[cell].in_use -= units;
                self.record_in_use(cell);
                self.serve_queue(cell);
                self.after_change(cell);
                self.check(self.cells[cell].product);
            }
            Ev::HoldExpire { cell, id } => {
                let c = &mut self.cells[cell];
                if let Some(i) = c.queue.iter().position(|x| x.id == id) {
                    let x = c.queue.remove(i).expect("found");
                    c.queued_units -= x.units;
                    self.metrics.waited(x.arrived, self.now - x.arrived);
                    self.deny(cell, x.units, x.hold, x.arrived);
                    self.serve_queue(cell);
                }
            }
            Ev::InstantAtBalancer {
                cell,
                units,
                deficit,
            } => {
                if !self.balancer_up(self.now) {
                    self.lost_request(cell, units, deficit);
                    return;
                }
                let p = self.cells[cell].product;
                // When the reserve cannot cover the urgent units, the balancer reads the donors'
                // statuses before it plans (the releases leave a round trip later); otherwise
                // it plans with what its last run saw.
                let status_read = self.books[p].reserve < deficit.min(units);
                let plan = matches!(self.kind, Kind::Allot { .. })
                    .then(|| self.plan_instant(cell, units, deficit, status_read));
                let g = plan
                    .as_ref()
                    .map_or(units.min(self.books[p].reserve), |plan| plan.from_reserve);
                self.books[p].reserve -= g;
                self.books[p].in_transit += g;
                if g > 0 {
                    self.metrics.moved(g);
                }
                let now = self.now;
                if let Some(r) = &mut self.recorder {
                    if g > 0 {
                        r.instant_grant(self.w, now, self.cells[cell].site, p, g);
                    }
                    r.run(now, RunTrigger::Instant, u64::from(g > 0));
                }
                self.metrics.transactions += 1;
                // When a reclaim is under way, its first grant carries the answer, so the
                // asker does not ask again before the reclaimed units arrive.
                let reclaiming = match plan {
                    Some(plan) => {
                        let asks: Vec<(usize, u64)> = plan
                            .releases
                            .iter()
                            .map(|&(site, units)| (self.cell(site as usize, p), units))
                            .collect();
                        let delay = if status_read { 2 * lat } else { 0 };
                        self.send_reclaims(cell, &asks, (units, deficit.min(units), g), delay)
                    }
                    None => {
                        g < units
                            && self.reclaim(
                                cell,
                                units - g,
                                deficit.saturating_sub(g),
                                (units, deficit.min(units), g),
                            )
                    }
                };
                if !reclaiming || g > 0 {
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell,
                            units: g,
                            reply: (!reclaiming).then_some((units, deficit.min(units), 0)),
                        },
                    );
                }
                self.check(p);
            }
            Ev::Grant { cell, units, reply } => {
                let p = self.cells[cell].product;
                self.books[p].in_transit -= units;
                let c = &mut self.cells[cell];
                c.alloc += units;
                if units > 0 {
                    c.granted_at = Some(self.now);
                }
                if let Some((asked, urgent, before)) = reply {
                    c.requests_in_flight = c.requests_in_flight.saturating_sub(1);
                    c.urgent_in_flight = c.urgent_in_flight.saturating_sub(urgent);
                    if c.requests_in_flight == 0 {
                        c.in_flight_since = None;
                        c.in_flight_urgent = false;
                        c.urgent_in_flight = 0;
                    }
                    let granted = before + units;
                    if granted < asked {
                        c.short_answer_at = Some(self.now);
                    }
                    if granted < urgent {
                        c.urgent_short_at = Some(self.now);
                    }
                }
                if units > 0 {
                    self.ping_pong(cell, units as i64);
                }
                self.serve_queue(cell);
                self.after_change(cell);
                self.check(p);
            }
            Ev::Release {
                cell,
                units,
                for_cell,
            } => {
                let p = self.cells[cell].product;
                let c = &mut self.cells[cell];
                let r = units.min(c.alloc.saturating_sub(c.in_use));
                c.alloc -= r;
                self.books[p].in_transit += r;
                if r > 0 {
                    self.ping_pong(cell, -(r as i64));
                    self.metrics.moved(r);
                }
                self.at(
                    self.now + lat,
                    Ev::ReleaseConfirm {
                        product: p,
                        units: r,
                        for_cell,
                    },
                );
                self.after_change(cell);
                self.check(p);
            }
            Ev::ReleaseConfirm {
                product,
                units,
                for_cell,
            } => {
                let b = &mut self.books[product];
                b.in_transit -= units;
                b.reserve += units;
                if let Some((to, reply)) = for_cell
                    && (units > 0 || reply.is_some())
                {
                    let g = units.min(b.reserve);
                    b.reserve -= g;
                    b.in_transit += g;
                    self.metrics.moved(g);
                    self.metrics.transactions += 1;
                    let now = self.now;
                    if g > 0
                        && let Some(r) = &mut self.recorder
                    {
                        r.instant_grant(self.w, now, self.cells[to].site, product, g);
                    }
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell: to,
                            units: g,
                            reply,
                        },
                    );
                }
                self.check(product);
            }
            Ev::RunGrants { product, grants } => {
                for (cell, units) in grants {
                    if !self.reachable(self.cells[cell].site, self.now) {
                        continue;
                    }
                    let b = &mut self.books[product];
                    let g = units.min(b.reserve);
                    if g == 0 {
                        continue;
                    }
                    b.reserve -= g;
                    b.in_transit += g;
                    self.metrics.moved(g);
                    self.metrics.transactions += 1;
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell,
                            units: g,
                            reply: None,
                        },
                    );
                }
                self.check(product);
            }
            Ev::Scheduled { generation } => {
                if generation != self.generation {
                    return;
                }
                let interval = match self.kind {
                    Kind::Sms { interval }
                    | Kind::Doorman { interval, .. }
                    | Kind::Allot { interval, .. } => interval,
                    _ => return,
                };
                let now = self.now;
                let next = match &mut self.cron_runs {
                    Some(runs) => {
                        while runs.front().is_some_and(|&t| t <= now) {
                            runs.pop_front();
                        }
                        runs.front().copied()
                    }
                    None => Some(now + interval),
                };
                if let Some(next) = next {
                    self.at(next, Ev::Scheduled { generation });
                }
                if self.balancer_up(now) {
                    self.metrics.scheduled_runs += 1;
                    let moves: u64 = (0..self.np).map(|p| self.scheduled(p)).sum();
                    if let Some(r) = &mut self.recorder {
                        r.run(now, RunTrigger::Scheduled, moves);
                    }
                }
            }
            Ev::Measure => {
                let violations = self.metrics.violations;
                self.metrics = Metrics::new(&self.metrics.policy, self.w);
                self.metrics.measure_from(self.w, self.now);
                self.metrics.violations = violations;
            }
            Ev::Advise => self.advise(),
            Ev::Recheck { cell } => {
                if self.cells[cell].recheck_at == Some(self.now) {
                    self.cells[cell].recheck_at = None;
                    self.after_change(cell);
                }
            }
            Ev::Sample => {
                self.sample();
                self.at(self.now + self.cfg.sample_every, Ev::Sample);
            }
            Ev::Crash { site, down_for } => {
                self.down_until[site] = self.now + down_for;
                for p in 0..self.np {
                    let k = self.cell(site, p);
                    let c = &mut self.cells[k];
                    c.in_use = 0;
                    c.epoch += 1;
                    let lost: Vec<Pending> = c.queue.drain(..).collect();
                    c.queued_units = 0;
                    for x in lost {
                        self.deny(k, x.units, x.hold, x.arrived);
                    }
                    self.check(p);
                }
            }
        }
    }

    /// Matches a move against opposite moves of the same cell within the last hour.
    pub(super) fn ping_pong(&mut self, k: usize, signed: i64) {
        let now = self.now;
        let c = &mut self.cells[k];
        while c.recent_moves.front().is_some_and(|&(t, _)| t + HOUR < now) {
            c.recent_moves.pop_front();
        }
        let mut left = signed.unsigned_abs() as i64;
        for m in c.recent_moves.iter_mut() {
            if left == 0 {
                break;
            }
            if m.1.signum() == -signed.signum() && m.1 != 0 {
                let matched = left.min(m.1.abs());
                self.metrics.ping_pong_units += matched as u64;
                left -= matched;
                m.1 -= matched * m.1.signum();
            }
        }
        if left > 0 {
            c.recent_moves.push_back((now, left * signed.signum()));
        }
    }
}
