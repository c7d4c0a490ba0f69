//! `allot-sim replay`: an operator's FlexNet logs through the shipped policy and the baselines.
//! A small synthetic log in the real logs' format (`fixtures/estate.log`: two days, three
//! features, three host groups, a pool the log shows full) drives the JSON, the site map,
//! `--purchased` and every bad-log case, through the built binary and the library.

use allot_sim::flexnet;
use allot_sim::replay::{self, Log, Options, Purchase, SiteMap, Source, glob_match};
use allot_sim::report::policies;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/estate.log")
}

fn fixture_text() -> String {
    std::fs::read_to_string(fixture()).expect("fixture")
}

/// A file under the test's scratch folder holding `bytes`.
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-tests");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_allot-sim"))
        .args(args)
        .output()
        .expect("allot-sim runs")
}

fn replay_cmd(args: &[&str]) -> Output {
    let mut all = vec!["replay", "--threads", "2"];
    all.extend_from_slice(args);
    sim(&all)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a replay that must fail with status 1 and an error naming `needle`; no panic.
fn fails_with(args: &[&str], needle: &str) -> String {
    let o = replay_cmd(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains("allot-sim: error: "), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn log(path: &Path) -> Log {
    replay::read_log(path).expect("the log reads")
}

#[test]
fn json_has_one_object_per_policy_with_the_documented_fields() {
    let path = fixture();
    let o = replay_cmd(&[path.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let rows = v.as_array().expect("a JSON array");
    let names: Vec<String> = policies().into_iter().map(|p| p.name).collect();
    let got: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(got, names, "one object per policy, in the tables' order");
    assert!(got.contains(&"allot") && got.contains(&"oracle"));
    let oracle = rows.iter().find(|r| r["policy"] == "oracle").unwrap();
    let oracle_denied = oracle["denied_percent"].as_f64().unwrap();
    for r in rows {
        for key in [
            "checkouts",
            "denied",
            "wait_p99_ms",
            "units_moved",
            "transactions",
            "safety_violations",
        ] {
            assert!(r[key].is_u64(), "{key}: {r}");
        }
        for key in [
            "denied_percent",
            "excess_pp",
            "false_denied_percent",
            "unserved_seat_hours",
            "waited_percent",
            "units_moved_per_checkout",
            "ping_pong_percent",
        ] {
            assert!(r[key].is_f64() || r[key].is_u64(), "{key}: {r}");
        }
        assert_eq!(r["checkouts"], 18, "every OUT of the fixture: {r}");
        assert_eq!(r["safety_violations"], 0, "{r}");
        let excess = r["excess_pp"].as_f64().unwrap();
        let denied = r["denied_percent"].as_f64().unwrap();
        assert!((excess - (denied - oracle_denied)).abs() < 1e-4, "{r}");
        let moved = r["units_moved"].as_f64().unwrap();
        let per = r["units_moved_per_checkout"].as_f64().unwrap();
        assert!((per - moved / 18.0).abs() < 1e-4, "{r}");
        let pp = r["ping_pong_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&pp), "{r}");
    }
    // The log's own pool served every logged checkout: the one pool denies none.
    assert_eq!(oracle["denied"], 0);
    assert_eq!(oracle["excess_pp"], 0.0);
}

#[test]
fn human_output_is_a_table_of_every_policy() {
    let path = fixture();
    let o = replay_cmd(&[path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("18 checkouts of 3 feature(s) on 3 site(s)"),
        "{out}"
    );
    assert!(out.contains("MATLAB 3 (the log's pool)"), "{out}");
    assert!(out.contains("SIMULINK 4 (calibrated)"), "{out}");
    assert!(out.contains("madrid-pc 8, paris-ws 6, hpc-node 4"), "{out}");
    for p in policies() {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(&p.name)),
            "{}: {out}",
            p.name
        );
    }
    assert!(out.contains("allot denies"), "{out}");
}

#[test]
fn the_fixture_parses_into_its_estate() {
    let l = log(&fixture());
    assert!(l.warnings().is_empty(), "{:?}", l.warnings());
    let p = &l.parsed;
    assert_eq!(p.checkouts.len(), 18);
    assert_eq!(p.unmatched_in, 1, "the IN at shutdown has no OUT");
    assert_eq!(p.denial_episodes, 2, "two attempts, each logged twice");
    assert!(p.pool_full.contains("MATLAB") && p.pool_full.len() == 1);
    // A user name with spaces keeps its host.
    let jose = p
        .checkouts
        .iter()
        .find(|c| c.user == "José Juan u0006")
        .expect("José Juan's checkout");
    assert_eq!(jose.host, "madrid-pc03");
    // Midnight roll-over: 23:50 → 00:40 is 50 minutes.
    let night = p.checkouts.iter().find(|c| c.host == "hpc-node08").unwrap();
    assert_eq!(night.end - night.start, 50 * 60_000);
    assert_eq!(night.units, 2);

    let e = replay::estate(&[l], &Options::default()).expect("estate");
    let w = &e.workload;
    assert_eq!(w.products, ["MATLAB", "SIMULINK", "Signal_Toolbox"]);
    assert_eq!(
        e.sources,
        [Source::Log, Source::Calibrated, Source::Calibrated]
    );
    assert_eq!(w.purchased[0], 3, "MATLAB's peak when the log said full");
    let sites: Vec<&str> = w.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(sites, ["madrid-pc", "paris-ws", "hpc-node"]);
    assert_eq!(e.site_checkouts, [8, 6, 4]);
    assert_eq!(w.arrivals.len(), 18);
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
}

#[test]
fn several_logs_are_one_estate_and_pools_add_up_only_while_they_overlap() {
    let text = fixture_text();
    // Two servers logging the same days: two pools of 3.
    let two = replay::estate(&[log(&fixture()), log(&fixture())], &Options::default()).unwrap();
    assert_eq!(two.workload.arrivals.len(), 36);
    assert_eq!(two.workload.purchased[0], 6);
    assert_eq!(two.sources[0], Source::Log);
    // One server's log rotated at 02:00 on the second day: one pool of 3.
    let cut = text.find(" 2:00:01 (lmgrd) TIMESTAMP 6/14/2022").unwrap();
    let a = scratch("rotated-1.log", &text.as_bytes()[..cut]);
    let b = scratch("rotated-2.log", &text.as_bytes()[cut..]);
    let rotated = replay::estate(&[log(&a), log(&b)], &Options::default()).unwrap();
    assert_eq!(rotated.workload.arrivals.len(), 18);
    assert_eq!(rotated.workload.purchased[0], 3);
    assert_eq!(rotated.sources[0], Source::Log);
    // The binary takes several logs too.
    let o = replay_cmd(&[a.to_str().unwrap(), b.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["checkouts"], 18);
}

#[test]
fn globs_match_hosts_ignoring_case() {
    assert!(glob_match("madrid-*", "MADRID-PC01"));
    assert!(glob_match("*-pc??", "madrid-pc01"));
    assert!(!glob_match("*-pc?", "madrid-pc01"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a*b*c", "axxbyyc"));
    assert!(!glob_match("a*b*c", "axxbyy"));
    assert!(glob_match("u0003@*", "u0003@paris-ws01"));
}

const MAP: &str = "\
# Sites of the estate: first match wins.
u0003@*      paris-hpc   # a user's hosts, by user@host
hpc-*        hpc
*-pc??       madrid
paris-*      paris
";

#[test]
fn a_site_map_puts_hosts_on_sites_first_match_wins() {
    let map = SiteMap::parse(MAP, "map.txt").unwrap();
    assert_eq!(map.site_of("u0003", "paris-ws01"), Some("paris-hpc"));
    assert_eq!(map.site_of("u0004", "paris-ws01"), Some("paris"));
    assert_eq!(map.site_of("u0005", "HPC-node07"), Some("hpc"));
    assert_eq!(map.site_of("x", "london-ws1"), None);
    let opts = Options {
        site_map: Some(map),
        ..Options::default()
    };
    let e = replay::estate(&[log(&fixture())], &opts).unwrap();
    let sites: Vec<(&str, u64)> = e
        .workload
        .sites
        .iter()
        .map(|s| s.name.as_str())
        .zip(e.site_checkouts.iter().copied())
        .collect();
    assert_eq!(
        sites,
        [("madrid", 8), ("hpc", 4), ("paris-hpc", 4), ("paris", 2)]
    );

    // Through the binary.
    let path = fixture();
    let map = scratch("sites.map", MAP.as_bytes());
    let o = replay_cmd(&[path.to_str().unwrap(), "--site-map", map.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("madrid 8, hpc 4, paris-hpc 4, paris 2"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn site_map_errors_name_the_map_and_line() {
    let path = fixture();
    let log = path.to_str().unwrap();
    // Hosts no rule matches.
    let partial = scratch("partial.map", b"madrid-* madrid\n");
    let err = fails_with(
        &[log, "--site-map", partial.to_str().unwrap()],
        "partial.map: 4 host(s) match no pattern",
    );
    assert!(
        err.contains("hpc-node07") && err.contains("`* SITE`"),
        "{err}"
    );
    // A line that is not `PATTERN SITE`.
    let bad = scratch("bad.map", b"# ok\nmadrid-* madrid\nparis-* paris france\n");
    fails_with(
        &[log, "--site-map", bad.to_str().unwrap()],
        "bad.map:3: expected `PATTERN SITE`",
    );
    // Nothing but comments.
    let empty = scratch("empty.map", b"# nothing\n\n");
    fails_with(
        &[log, "--site-map", empty.to_str().unwrap()],
        "empty.map: no `PATTERN SITE` line",
    );
    // Missing.
    fails_with(
        &[log, "--site-map", "/nonexistent/sites.map"],
        "/nonexistent/sites.map: ",
    );
    // A site map covering everything with a catch-all.
    let all = scratch("all.map", b"madrid-* madrid\n* elsewhere\n");
    let o = replay_cmd(&[log, "--site-map", all.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("elsewhere 10, madrid 8"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn purchased_overrides_the_logs_and_the_calibration() {
    let l = log(&fixture());
    let with = |purchased: Vec<Purchase>| {
        let opts = Options {
            purchased,
            ..Options::default()
        };
        replay::estate(std::slice::from_ref(&l), &opts).unwrap()
    };
    let e = with(vec![Purchase::All(5)]);
    assert_eq!(e.workload.purchased, [5, 5, 5]);
    assert_eq!(e.sources, [Source::Given; 3]);
    let e = with(vec!["MATLAB=10".parse().unwrap()]);
    assert_eq!(e.workload.purchased[0], 10);
    assert_eq!(
        e.sources,
        [Source::Given, Source::Calibrated, Source::Calibrated]
    );
    // A feature's own value wins over the one for every feature.
    let e = with(vec![Purchase::All(5), "SIMULINK=2".parse().unwrap()]);
    assert_eq!(e.workload.purchased, [5, 2, 5]);
    assert!("0".parse::<Purchase>().is_err());
    assert!("MATLAB=x".parse::<Purchase>().is_err());

    let path = fixture();
    let log = path.to_str().unwrap();
    // One unit of everything: checkouts of 2 and 4 units can never be served.
    let o = replay_cmd(&[log, "--purchased", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v[0]["denied"].as_u64().unwrap() >= 2, "{}", v[0]);
    let o = replay_cmd(&[log, "--purchased", "MATLAB=10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("MATLAB 10 (--purchased)"),
        "{}",
        stdout(&o)
    );
    // Bad values are argument errors (status 2); unknown features are errors naming them.
    let o = replay_cmd(&[log, "--purchased", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    fails_with(
        &[log, "--purchased", "Nope=3"],
        "feature `Nope` is in none of the logs",
    );
    fails_with(
        &[log, "--feature", "MATLAB", "--purchased", "SIMULINK=3"],
        "feature `SIMULINK` is not replayed",
    );
}

#[test]
fn a_feature_filter_keeps_only_those_features() {
    let path = fixture();
    let log = path.to_str().unwrap();
    let o = replay_cmd(&[log, "--feature", "SIMULINK", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["checkouts"], 4);
    let err = fails_with(
        &[log, "--feature", "matlab"],
        "feature `matlab` is in none of the logs",
    );
    assert!(err.contains("did you mean `MATLAB`?"), "{err}");
}

#[test]
fn a_missing_log_is_an_error_naming_it() {
    fails_with(&["/nonexistent/lmgrd.log"], "/nonexistent/lmgrd.log: ");
    // One good log and one missing: still an error, no partial replay.
    let path = fixture();
    let o = replay_cmd(&[path.to_str().unwrap(), "/nonexistent/b.log"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
}

#[test]
fn a_binary_log_is_an_error_naming_the_line() {
    let mut bytes = fixture_text().into_bytes();
    // Line 20 of the fixture gets NUL bytes in the middle.
    let at = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(18)
        .unwrap()
        .0
        + 5;
    bytes.splice(at..at, [0u8, 0, 7, 0]);
    let bad = scratch("binary.log", &bytes);
    fails_with(
        &[bad.to_str().unwrap()],
        &format!("{}:20: binary data", bad.display()),
    );
    // Compressed and UTF-16 logs say what to do.
    let gz = scratch("log.gz", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
    fails_with(&[gz.to_str().unwrap()], "gzip-compressed");
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(" 8:00:00 (lmgrd) x\n".bytes().flat_map(|b| [b, 0]))
        .collect();
    let u = scratch("utf16.log", &utf16);
    fails_with(&[u.to_str().unwrap()], "UTF-16");
    // Random bytes.
    let noise: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let n = scratch("noise.bin", &noise);
    fails_with(&[n.to_str().unwrap()], "binary data");
}

#[test]
fn text_that_is_not_utf8_is_read_as_latin1() {
    let text = fixture_text().replace("José Juan", "Jos\u{0}");
    let mut bytes = text.into_bytes();
    for b in &mut bytes {
        if *b == 0 {
            *b = 0xe9; // é in Latin-1
        }
    }
    let p = flexnet::parse_checked(&bytes).expect("Latin-1 text reads");
    assert_eq!(p.latin1_lines, 4);
    assert!(p.checkouts.iter().any(|c| c.user == "José u0006"));
    assert_eq!(p.checkouts.len(), 18);
}

#[test]
fn a_truncated_log_skips_its_cut_last_line_with_a_warning() {
    let text = fixture_text();
    // Cut in the middle of the OUT on line 25.
    let at = text.find(" 9:16:02 (MLM) OUT: \"MAT").unwrap() + 24;
    let cut = scratch("truncated.log", &text.as_bytes()[..at]);
    let l = log(&cut);
    assert_eq!(l.parsed.truncated_line, Some(25));
    assert!(l.warnings()[0].contains("truncated.log:25: the last line is cut mid-record"));
    let o = replay_cmd(&[cut.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: ") && stderr(&o).contains("truncated.log:25:"),
        "{}",
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["checkouts"], 4, "the four OUTs before the cut");
    // Cut inside the host name: lmgrd ends event lines with blanks, so this is cut too.
    let at = text
        .find(" 9:16:02 (MLM) OUT: \"MATLAB\" u0004@paris-ws")
        .unwrap()
        + 41;
    let l = log(&scratch("cut-host.log", &text.as_bytes()[..at]));
    assert_eq!(l.parsed.truncated_line, Some(25));
    assert_eq!(l.parsed.checkouts.len(), 4);
    // A whole last line without its newline is kept, without a warning.
    let whole = text.trim_end_matches('\n');
    let l = log(&scratch("no-final-newline.log", whole.as_bytes()));
    assert_eq!(l.parsed.truncated_line, None);
    assert!(l.warnings().is_empty(), "{:?}", l.warnings());
    assert_eq!(l.parsed.unmatched_in, 1, "the last line (an IN) was read");
    let at = text.find("15:02:00 (MLM) OUT").unwrap();
    let end = at + text[at..].find('\n').unwrap();
    let l = log(&scratch("last-out.log", &text.as_bytes()[..end]));
    assert_eq!(l.parsed.truncated_line, None);
    assert!(l.parsed.checkouts.iter().any(|c| c.host == "madrid-pc03"));
    // Cut inside the first line: nothing complete at all.
    let tiny = scratch("tiny.log", b" 8:00:00 (lmg");
    fails_with(&[tiny.to_str().unwrap()], "tiny.log:1: cut mid-record");
}

#[test]
fn a_log_without_checkouts_is_an_error() {
    let text = fixture_text();
    let header: String = text.lines().take(16).map(|l| format!("{l}\n")).collect();
    let none = scratch("no-out.log", header.as_bytes());
    fails_with(&[none.to_str().unwrap()], "no-out.log: no checkouts");
    // OUT lines, but none dated: the error names the first.
    let undated: String = text
        .lines()
        .filter(|l| !l.contains("started on") && !l.contains("Date") && !l.contains("TIMESTAMP"))
        .map(|l| format!("{l}\n"))
        .collect();
    let u = scratch("undated.log", undated.as_bytes());
    fails_with(
        &[u.to_str().unwrap()],
        "undated.log:12: event before any date line",
    );
    // Not a FlexNet log at all, and an empty file.
    let csv = scratch("usage.csv", b"user,host,feature\nu1,h1,MATLAB\n");
    fails_with(
        &[csv.to_str().unwrap()],
        "usage.csv: no FlexNet debug-log line",
    );
    let empty = scratch("empty.log", b"");
    fails_with(&[empty.to_str().unwrap()], "empty.log: empty file");
}

#[test]
fn a_malformed_record_is_an_error_naming_the_line() {
    let text = fixture_text().replace(
        "10:20:41 (MLM) IN: \"Signal_Toolbox\" u0003@paris-ws01",
        "10:20:41 (MLM) IN: \"Signal_Toolbox u0003@paris-ws01",
    );
    let bad = scratch("malformed.log", text.as_bytes());
    fails_with(
        &[bad.to_str().unwrap()],
        "malformed.log:27: malformed IN: record",
    );
    // The lenient parser of the benchmarks skips it.
    assert_eq!(flexnet::parse(&text).checkouts.len(), 18);
}

#[test]
fn help_lists_the_workloads_and_the_replay_command() {
    let o = sim(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for w in [
        "follow-the-sun",
        "partition",
        "replay-matlab",
        "replay-autodesk",
    ] {
        assert!(out.contains(w), "{w}: {out}");
    }
    assert!(out.contains("replay"), "{out}");
    let o = sim(&["replay", "--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for flag in ["--site-map", "--purchased", "--json", "PATTERN SITE"] {
        assert!(out.contains(flag), "{flag}: {out}");
    }
    // Removed policy knobs are rejected: the simulator runs the shipped policy.
    let o = sim(&["--workload", "step", "--forecast-floor-percent", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = sim(&["--workload", "no-such-workload"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_default_bench_run_still_prints_the_tables() {
    // A tiny step workload, the oracle and allot only; both spellings.
    let args = [
        "--workload",
        "step",
        "--days",
        "1",
        "--products",
        "2",
        "--load",
        "0.2",
        "--policy",
        "allot",
        "--threads",
        "2",
    ];
    for prefix in [&[][..], &["bench"][..]] {
        let all: Vec<&str> = prefix.iter().chain(args.iter()).copied().collect();
        let o = sim(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("| workload | oracle denied %"), "{out}");
        assert!(out.contains("| step |"), "{out}");
        assert!(out.contains("| **allot** |"), "{out}");
    }
}

#[test]
fn the_real_logs_read_strictly_and_as_the_benchmarks_read_them() {
    let dir = std::env::var("ALLOT_TRACES").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces"),
        PathBuf::from,
    );
    for file in [
        "autodesk-2016.log",
        "matlab-upm-2022.log",
        "ansys-umich-2017.log",
    ] {
        let Ok(bytes) = std::fs::read(dir.join(file)) else {
            eprintln!("{file} not found beside the repository: skipped");
            continue;
        };
        let l = log(&dir.join(file));
        assert!(l.warnings().is_empty(), "{file}: {:?}", l.warnings());
        let lenient = flexnet::parse(&String::from_utf8_lossy(&bytes));
        assert_eq!(l.parsed.checkouts, lenient.checkouts, "{file}");
        let e = replay::estate(&[l], &Options::default()).expect("estate");
        assert_eq!(e.workload.arrivals.len(), lenient.checkouts.len(), "{file}");
    }
}
