//! The README's first command runs `allot-balancer demo`: it must start a balancer and three
//! metering servers, serve the simulated users, show the books, and stop cleanly by itself.

use allot_tests::process::binary;
use std::process::Command;

#[test]
fn the_demo_runs_shows_the_books_and_stops_cleanly() {
    let output = Command::new(binary("allot-balancer"))
        .args(["demo", "--duration-seconds", "8", "--no-clear"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "CAD Suite: purchased 24",
        "Simulator: purchased 8",
        "paris",
        "new-york",
        "tokyo",
        "/metrics",
        "stopping",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // Simulated users were served: some site shows units in use in the last frame.
    let last_frame = stdout.rsplit("allot demo —").next().unwrap_or_default();
    let in_use: u64 = last_frame
        .lines()
        .filter(|l| l.trim_start().starts_with(['p', 'n', 't']) && l.contains(':'))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    assert!(
        in_use > 0,
        "no unit in use in the last frame:\n{last_frame}"
    );
    // The demo tells the truth about the policy: it shows false denials (units waiting clients
    // could not get while units were free elsewhere) and ping-pong, and there are none.
    for product in ["CAD Suite", "Simulator"] {
        let line = last_frame
            .lines()
            .find(|l| l.starts_with(&format!("{product}: purchased")))
            .unwrap_or_else(|| panic!("no books line for {product}:\n{last_frame}"));
        assert!(
            line.contains("unserved waiting: false 0 "),
            "false denials in the demo: {line}"
        );
        assert!(line.contains("ping-pong units"), "{line}");
    }
}
