//! How long the planner takes at enterprise scale: servers ∈ {10, 100, 1000} × products ∈
//! {10, 100, 1000}, every server holding every product (cells = servers × products).
//!
//! Snapshots are synthetic but deterministic (a seeded splitmix64 written here, no `rand`), with
//! a mix that exercises every branch: overdrafts, mins, draining servers, starving cells,
//! recently granted (held) cells, demand signals that keep or release idle excess, and reserves
//! that leave some products ample and others scarce. Only `plan` is timed, on one
//! thread. Run with `cargo bench -p allot-core --bench planner`; the results table lives in
//! docs/BENCHMARKS.md. Target: one million cells in under a second, growth no worse than
//! n log n.

use allot_core::demand::Signals;
use allot_core::planner::{
    CellSnapshot, Demand, PlannerConfig, ProductSnapshot, Scarcity, Snapshot, plan,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

/// splitmix64: tiny, seedable and good enough to spread synthetic demand.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` %.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn snapshot(servers: u32, products: u32, seed: u64) -> Snapshot {
    let mut rng = Rng(seed);
    let products = (0..products)
        .map(|product| {
            let cells: Vec<CellSnapshot> = (0..servers)
                .map(|server| {
                    let allocation = rng.below(50);
                    let in_use = if rng.chance(5) {
                        allocation + 1 + rng.below(5)
                    } else {
                        rng.below(allocation + 1)
                    };
                    let pressure = |rng: &mut Rng, percent| {
                        if rng.chance(percent) {
                            1 + rng.below(4)
                        } else {
                            0
                        }
                    };
                    CellSnapshot {
                        server,
                        allocation,
                        in_use,
                        min_units: if rng.chance(20) { rng.below(10) } else { 0 },
                        buffer_units: rng.below(5),
                        draining: rng.chance(1),
                        recently_granted: rng.chance(5),
                        demand: Demand {
                            peak_in_use: in_use + rng.below(5),
                            denials: pressure(&mut rng, 10),
                            waiting: pressure(&mut rng, 5),
                            instant_requests: pressure(&mut rng, 5),
                            signals: Signals {
                                level: rng.below(50),
                                window_peak: rng.below(50),
                                forecast: if rng.chance(30) { rng.below(50) } else { 0 },
                            },
                        },
                    }
                })
                .collect();
            let reserve = rng.below(u64::from(servers) * 20 + 1);
            let in_transit = rng.below(3);
            let allocated: u64 = cells.iter().map(|c| c.allocation).sum();
            ProductSnapshot {
                product,
                purchased: reserve + in_transit + allocated,
                reserve,
                in_transit,
                cells,
            }
        })
        .collect();
    Snapshot { products }
}

fn bench(c: &mut Criterion) {
    let config = PlannerConfig::default();
    let mut group = c.benchmark_group("planner");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for servers in [10u32, 100, 1000] {
        for products in [10u32, 100, 1000] {
            let cells = u64::from(servers) * u64::from(products);
            let input = snapshot(servers, products, 0x5eed ^ cells);
            // Check once, outside the timing, that the synthetic estate is plannable and mixed.
            let planned = plan(&input, &config).expect("synthetic books balance");
            let scarce = planned
                .products
                .iter()
                .filter(|p| p.scarcity != Scarcity::Ample)
                .count();
            assert!(products < 10 || (scarce > 0 && scarce < planned.products.len()));
            drop(planned);

            group.throughput(Throughput::Elements(cells));
            // Ten samples of the largest size need about four seconds.
            let measure = match cells {
                1_000_000.. => 4_000,
                100_000.. => 2_000,
                _ => 1_000,
            };
            group.measurement_time(Duration::from_millis(measure));
            group.bench_with_input(
                BenchmarkId::new("plan", format!("{servers}x{products}")),
                &input,
                |b, input| b.iter(|| plan(black_box(input), &config)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
