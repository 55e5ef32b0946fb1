//! `cargo xtask`: developer and operator entry points.
//!
//! - `cargo xtask demo [--dir DIR] [--tls] [--storage local|nats]`: Coffer with the embedded
//!   defaults, in the foreground.
//! - `cargo xtask test [--slow] [-- FILTER...]`: installs what the suite needs, runs it.
//! - `cargo xtask bench lifecycle`: create → ACTIVE against the bare-MariaDB floor.
//! - `cargo xtask bench backup [--size-mb N]`: backup and restore against mariabackup | zstd.
//! - `cargo xtask bench pitr [--size-mb N] [--seconds S]`: RPO under a writer, the agent's cost
//!   while archiving, and a restore to time's replay against `mariadb-binlog | mariadb`.
//! - `cargo xtask bench replication [--size-mb N]`: replica creation against its floor by hand,
//!   switchover write gap, failover time.
//! - `cargo xtask dist [--out DIR]`: release binaries packaged as coffer-agent and
//!   coffer-controller .deb and .rpm files (units, default configs, maintainer scripts) in `target/dist/`.
//! - `cargo xtask image [--out FILE] [--test]`: the qcow2 guest image (Debian 12, MariaDB,
//!   cloud-init, the agent package) in `target/dist/`; `--test` boots it to ACTIVE.
//! - `cargo xtask gen-rules`: regenerates the committed MariaDB configuration-parameter rules
//!   (`proto/rules/`) from the installed server (review the diff, then commit).
//! - `cargo xtask tls-ca DIR`: a local CA and a certificate for 127.0.0.1 (`ca.pem`,
//!   `server.pem`, `server.key`), as `demo --tls` and the TLS tests use.
//!
//! Every step installs what it needs idempotently (apt packages, a Python venv with nats-server
//! ≥ 2.10 and python-troveclient) and says what it is doing.

mod bench;
mod bench_backup;
mod bench_pitr;
mod bench_replication;
mod demo;
mod dist;
mod env;
mod image;

use anyhow::bail;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("usage: cargo xtask <demo|test|bench lifecycle> [options]");
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "demo" => demo::run(rest),
        "test" => test(rest),
        "dist" => dist::run(rest),
        "image" => image::run(rest),
        "gen-rules" => {
            std::env::set_var("COFFER_UPDATE_RULES", "1");
            test(&[
                "--".into(),
                "committed_parameter_rules_match_the_server".into(),
            ])
        }
        "bench" if rest.first().map(String::as_str) == Some("backup") => {
            bench_backup::run(&rest[1..])
        }
        "bench" if rest.first().map(String::as_str) == Some("replication") => {
            bench_replication::run(&rest[1..])
        }
        "bench" if rest.first().map(String::as_str) == Some("pitr") => bench_pitr::run(&rest[1..]),
        "bench" if rest.first().map(String::as_str) == Some("scale") => bench::scale(&rest[1..]),
        "bench" => bench::run(rest),
        "tls-ca" => {
            let dir = rest
                .first()
                .ok_or_else(|| anyhow::anyhow!("usage: cargo xtask tls-ca DIR"))?;
            demo::make_ca(std::path::Path::new(dir))
        }
        other => bail!("unknown xtask command '{other}'; try demo, test, bench or gen-rules"),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let slow = args.iter().any(|a| a == "--slow");
    let filters: Vec<&String> = args.iter().skip_while(|a| *a != "--").skip(1).collect();
    let tools = env::prepare()?;
    env::step("building the workspace");
    env::cargo(&["build", "--workspace", "--bins", "--tests"])?;
    let mut cmd = if env::has_nextest() {
        let mut c = env::cargo_cmd(&["nextest", "run", "--workspace", "--no-fail-fast"]);
        c.args(["--test-threads", "4"]);
        c
    } else {
        env::cargo_cmd(&["test", "--workspace", "--no-fail-fast"])
    };
    for f in &filters {
        cmd.arg(f);
    }
    if slow {
        cmd.env("COFFER_SLOW_TESTS", "1");
        // The property tests' long run (the default run has proptest's 256 cases each).
        if std::env::var_os("PROPTEST_CASES").is_none() {
            cmd.env("PROPTEST_CASES", "20000");
        }
    }
    tools.apply(&mut cmd);
    env::step("running the test suite");
    let status = cmd.status()?;
    eprintln!(
        "xtask: test suite finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the test suite failed ({status})");
    }
    // The whole suite (no filter) also runs every bench once in smoke mode, so a change that
    // breaks a bench fails here (the scale bench's smoke run is a test of its own).
    if filters.is_empty() {
        let t = std::time::Instant::now();
        env::step("running the benches in smoke mode");
        bench::smoke_all()?;
        eprintln!(
            "xtask: benches ran in smoke mode in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
