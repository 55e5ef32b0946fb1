//! `cargo xtask bench pitr [--size-mb N] [--seconds S]`: point-in-time recovery, in one run:
//! - RPO under a continuous writer: now − the latest restorable time, sampled every 20 ms from
//!   the agent's ledger (what is stored) and from the API (what the controller shows), p50/p99;
//! - the agent's CPU and peak RSS while it archives;
//! - replay: a restore to the latest time replays about N MB of changes (fetched, unsealed,
//!   rebuilt and replayed by the agent) against the floor, `mariadb-binlog | mariadb` of the
//!   source's own binary log into a restore of the same backup;
//! - PostgreSQL's replay: a restore to the latest time over about N MB of WAL (create → ACTIVE,
//!   less a restore of the same backup without a time) against the floor, the server's own
//!   recovery of the same WAL (a `pg_basebackup` taken beside the backup, the source's WAL
//!   files put in its `pg_wal`, started with the instance's memory settings until it answers).
//!
//! Release binaries. Figures, not assertions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::bench::{with_release, Bench};
use crate::bench_replication::{get, sql};
use crate::env;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut size_mb = 256u64;
    let mut seconds = 20u64;
    let mut smoke = false;
    let mut which = "all".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mb" => size_mb = it.next().context("--size-mb N")?.parse()?,
            "--seconds" => seconds = it.next().context("--seconds S")?.parse()?,
            "--smoke" => (smoke, size_mb, seconds) = (true, 2, 3),
            "--datastore" => which = it.next().context("--datastore mariadb|postgresql|all")?.clone(),
            other => bail!(
                "unknown bench pitr option '{other}' (known: --size-mb N, --seconds S, --datastore mariadb|postgresql|all, --smoke)"
            ),
        }
    }
    if !["all", "mariadb", "postgresql"].contains(&which.as_str()) {
        bail!("--datastore takes mariadb, postgresql or all");
    }
    with_release("coffer-bench-pitr", smoke, |tools, bins, tmp| {
        if which != "postgresql" {
            let dir = tmp.join("mariadb");
            std::fs::create_dir_all(&dir)?;
            bench(tools, bins, &dir, size_mb, seconds)?;
        }
        if which != "mariadb" {
            let dir = tmp.join("postgresql");
            std::fs::create_dir_all(&dir)?;
            bench_postgresql(tools, bins, &dir, size_mb, if smoke { 1 } else { 3 })?;
        }
        Ok(())
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// (p50, p99, max) of samples (zeros when there are none).
fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn ledger_latest_us(state: &Path) -> i64 {
    std::fs::read(state.join("archive.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .and_then(|v| v["latest_us"].as_i64())
        .unwrap_or(0)
}

fn rfc3339_ms(v: &Value) -> Option<i64> {
    // "2026-12-02T01:23:33.109Z": days from the civil date, then the time of day.
    let s = v.as_str()?;
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some((days * 86400 + h * 3600 + mi * 60) * 1000 + (sec * 1000.0).round() as i64)
}

/// Waits until the instance's latest restorable time reaches `at_ms`; returns it as shown.
fn latest_after(coffer: &Bench, id: &str, at_ms: i64) -> anyhow::Result<Value> {
    loop {
        let v = get(coffer, id)?;
        if rfc3339_ms(&v["recovery"]["latest"]).is_some_and(|l| l >= at_ms) {
            return Ok(v["recovery"]["latest"].clone());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// From a restoring agent's log: how long its roll-forward took (s) and the MiB of archive.
fn rolled_forward(log: &str) -> Option<(f64, f64)> {
    let line = log.lines().find(|l| l.contains("rolled forward"))?;
    let took = line.split(" in ").nth(1)?.split(' ').next()?.parse().ok()?;
    let mib = line
        .split('(')
        .nth(1)
        .and_then(|x| x.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    Some((took, mib))
}

fn bench(
    tools: &env::Tools,
    bins: &Path,
    tmp: &Path,
    size_mb: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let (_, extra) = crate::bench_backup::backup_config(tmp)?;
    let coffer = Bench::start(tools, bins, tmp, &extra)?;
    let (src, _) = coffer.create(json!({"instance": {"name": "src", "flavorRef": "3",
        "volume": {"size": 10}, "databases": [{"name": "shop"}]}}))?;
    let state = |id: &str| tmp.join("instances").join(id).join("state");
    let sroot = state(&src).join("mariadb");
    sql(
        &sroot,
        "CREATE TABLE shop.p (id BIGINT AUTO_INCREMENT PRIMARY KEY, at BIGINT, b VARCHAR(200)); \
                 CREATE TABLE shop.big (id BIGINT AUTO_INCREMENT PRIMARY KEY, b VARCHAR(1000))",
    )?;
    let (_, _, bid) = crate::bench_backup::coffer_backup(&coffer, &src)?;
    let agent: i32 = std::fs::read_to_string(state(&src).join("agent.pid"))?
        .trim()
        .parse()?;

    // RPO and the agent's cost under a continuous writer (a row every 5 ms, one session).
    env::step(&format!("a continuous writer for {seconds} s"));
    let mut w = Command::new("mariadb")
        .arg(format!(
            "--defaults-file={}",
            sroot.join("admin.cnf").display()
        ))
        .arg("shop")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let mut stdin = w.stdin.take().context("writer stdin")?;
    let ticks0 = crate::bench::proc_cpu_ticks(agent);
    let t0 = Instant::now();
    let (mut ledger_rpo, mut api_rpo, mut peak_rss) = (vec![], vec![], 0u64);
    let mut next_write = Instant::now();
    let mut next_api = Instant::now();
    let mut next_sample = Instant::now() + Duration::from_secs(1);
    while t0.elapsed() < Duration::from_secs(seconds) {
        let now = Instant::now();
        if now >= next_write {
            writeln!(
                stdin,
                "INSERT INTO p (at, b) VALUES ({}, REPEAT('x', 150));",
                now_us()
            )?;
            stdin.flush()?;
            next_write += Duration::from_millis(5);
        }
        if now >= next_sample {
            let l = ledger_latest_us(&state(&src));
            if l > 0 {
                ledger_rpo.push((now_us() - l) as f64 / 1e6);
            }
            peak_rss = peak_rss.max(crate::bench::proc_rss_kb(agent));
            next_sample += Duration::from_millis(20);
        }
        if now >= next_api {
            if let Some(l) = rfc3339_ms(&get(&coffer, &src)?["recovery"]["latest"]) {
                api_rpo.push((now_us() / 1000 - l) as f64 / 1e3);
            }
            next_api += Duration::from_millis(200);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let busy = t0.elapsed().as_secs_f64();
    let cpu = (crate::bench::proc_cpu_ticks(agent) - ticks0) as f64 / 100.0 / busy * 100.0;
    drop(stdin);
    w.wait()?;

    // About `size_mb` MB of changes, then a restore to the latest time against the floor.
    env::step(&format!("writing about {size_mb} MB of changes"));
    let statements = (size_mb * 1_000_000 / 400_000).max(1);
    let mut gen = String::new();
    for _ in 0..statements {
        gen.push_str("INSERT INTO shop.big (b) SELECT CONCAT(SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512)) FROM seq_1_to_1000;\n");
    }
    let mut g = Command::new("mariadb")
        .arg(format!(
            "--defaults-file={}",
            sroot.join("admin.cnf").display()
        ))
        .arg("shop")
        .stdin(Stdio::piped())
        .spawn()?;
    g.stdin.take().context("stdin")?.write_all(gen.as_bytes())?;
    if !g.wait()?.success() {
        bail!("generating changes failed");
    }
    let rows = sql(
        &sroot,
        "SELECT (SELECT COUNT(*) FROM shop.big) + (SELECT COUNT(*) FROM shop.p)",
    )?;
    let latest = latest_after(&coffer, &src, now_us() / 1000)?;
    env::step("restoring to the latest restorable time");
    let (pitr, pitr_s) = coffer.create(json!({"instance": {"name": "pitr", "flavorRef": "3",
        "volume": {"size": 10}, "restorePoint": {"backupRef": bid, "restore_time": latest}}}))?;
    let log = std::fs::read_to_string(tmp.join("instances").join(&pitr).join("agent.log"))
        .unwrap_or_default();
    let (replay_s, mib) =
        rolled_forward(&log).context("the restore's agent logged no roll-forward")?;
    let prows = sql(
        &state(&pitr).join("mariadb"),
        "SELECT (SELECT COUNT(*) FROM shop.big) + (SELECT COUNT(*) FROM shop.p)",
    )?;

    env::step("the floor: mariadb-binlog | mariadb into a restore of the same backup");
    let (floor, _) = coffer.create(json!({"instance": {"name": "floor", "flavorRef": "3",
        "volume": {"size": 10}, "restorePoint": {"backupRef": bid}}}))?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(
        tmp.join("backups").join(&src).join(format!("{bid}.json")),
    )?)?;
    let (file, pos) = (
        manifest["position"]["binlog_file"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        manifest["position"]["binlog_pos"].as_u64().unwrap_or(4),
    );
    let data = sroot.join("data");
    let index = std::fs::read_to_string(data.join("mysql-bin.index"))?;
    let files: Vec<PathBuf> = index
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|f| *f >= file.as_str())
        .map(|f| data.join(f))
        .collect();
    let froot = state(&floor).join("mariadb");
    let t = Instant::now();
    let mut dump = Command::new("mariadb-binlog")
        .arg(format!("--start-position={pos}"))
        .args(&files)
        .stdout(Stdio::piped())
        .spawn()?;
    let out = dump.stdout.take().context("mariadb-binlog stdout")?;
    let st = Command::new("mariadb")
        .arg(format!(
            "--defaults-file={}",
            froot.join("admin.cnf").display()
        ))
        .args(["--binary-mode", "--max-allowed-packet=1G", "--batch"])
        .stdin(out)
        .status()?;
    dump.wait()?;
    if !st.success() {
        bail!("the floor's replay failed");
    }
    let floor_s = t.elapsed().as_secs_f64();
    let frows = sql(
        &froot,
        "SELECT (SELECT COUNT(*) FROM shop.big) + (SELECT COUNT(*) FROM shop.p)",
    )?;

    let (l50, l99, lmax) = percentiles(&mut ledger_rpo);
    let (a50, a99, amax) = percentiles(&mut api_rpo);
    println!();
    println!(
        "pitr ({}; {:.0} s writer, a row every 5 ms)",
        crate::bench::build_label(bins),
        busy
    );
    println!("  RPO, stored (agent's ledger):   p50 {l50:.3} s  p99 {l99:.3} s  max {lmax:.3} s  ({} samples; target p99 <= 1 s)", ledger_rpo.len());
    println!("  RPO, shown (API recovery.latest): p50 {a50:.3} s  p99 {a99:.3} s  max {amax:.3} s  (heartbeats carry it)");
    println!(
        "  agent while archiving:          {cpu:.1} % of a core, peak RSS {:.1} MB",
        peak_rss as f64 / 1024.0
    );
    println!(
        "  replay of {mib:.0} MiB of changes: Coffer {replay_s:.2} s (restore to time, create → ACTIVE {pitr_s:.1} s)  floor {floor_s:.2} s  → {:.2}× the floor's speed (target ≥ 0.9)",
        floor_s / replay_s.max(1e-6)
    );
    println!("  rows: source {rows}, restored to time {prows}, floor {frows}");
    if rows != prows || rows != frows {
        bail!("the restores do not hold the source's rows: source {rows}, restored {prows}, floor {frows}");
    }
    coffer.stop();
    Ok(())
}

/// PostgreSQL: Coffer's restore to the latest time against the server's own recovery of the
/// same WAL.
fn bench_postgresql(
    tools: &env::Tools,
    bins: &Path,
    tmp: &Path,
    size_mb: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    use crate::bench_backup::PgAdmin;
    let (_, extra) = crate::bench_backup::backup_config(tmp)?;
    let coffer = Bench::start(tools, bins, tmp, &extra)?;
    let pg_type = json!({"type": "postgresql"});
    let (src, _) = coffer.create(json!({"instance": {"name": "pg-src", "flavorRef": "3",
        "volume": {"size": 10}, "datastore": pg_type}}))?;
    let pg = PgAdmin::of(tmp, &src)?;
    pg.psql("CREATE TABLE big (id bigserial PRIMARY KEY, b text)")?;
    env::step(
        "Coffer backup, and the floor's base beside it (pg_basebackup, a slot keeping the WAL)",
    );
    let (_, _, bid) = crate::bench_backup::coffer_backup(&coffer, &src)?;
    let floor_dir = tmp.join("floor-data");
    let st = Command::new(format!("{}/pg_basebackup", pg.bin))
        .args(["-h", "127.0.0.1", "-p", &pg.port, "-U", "coffer_admin"])
        .arg("-D")
        .arg(&floor_dir)
        .args([
            "-Fp",
            "-X",
            "stream",
            "--checkpoint=fast",
            "-C",
            "-S",
            "bench_floor",
        ])
        .env("PGPASSWORD", &pg.password)
        .status()?;
    if !st.success() {
        bail!("the floor's pg_basebackup failed");
    }

    env::step(&format!("writing about {size_mb} MB of changes"));
    // About 200 bytes of WAL a row, at most 200,000 rows a statement.
    let mut left = (size_mb * 1_000_000 / 200).max(1000);
    while left > 0 {
        let n = left.min(200_000);
        pg.psql(&format!(
            "INSERT INTO big (b) SELECT md5(random()::text) || md5(random()::text) || md5(random()::text) \
             || md5(random()::text) FROM generate_series(1, {n})"
        ))?;
        left -= n;
    }
    let rows = pg.psql("SELECT count(*) FROM big")?;
    let latest = latest_after(&coffer, &src, now_us() / 1000)?;

    // The floor's data directory, ready to start: the base, the source's WAL in its pg_wal.
    let wal = pg.root.join("data").join("pg_wal");
    let fwal = floor_dir.join("pg_wal");
    for e in std::fs::read_dir(&wal)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.len() == 24 && !fwal.join(&name).exists() {
            std::fs::copy(e.path(), fwal.join(&name))?;
        }
    }
    pg.psql("SELECT pg_drop_replication_slot('bench_floor')")?;
    let _ = std::fs::remove_file(floor_dir.join("postgresql.auto.conf"));
    std::fs::write(floor_dir.join("postgresql.conf"), "")?;
    std::fs::write(floor_dir.join("pg_hba.conf"), "local all all trust\n")?;
    std::fs::write(floor_dir.join("pg_ident.conf"), "")?;
    let settings = (
        pg.setting("shared_buffers")?,
        pg.setting("max_connections")?,
    );

    let mut r = PgRounds::default();
    for i in 0..rounds {
        env::step(&format!(
            "round {}/{rounds}: Coffer restores the backup as it is, then to the latest restorable time",
            i + 1
        ));
        let (plain, plain_s) =
            coffer.create(json!({"instance": {"name": format!("pg-plain-{i}"),
            "flavorRef": "3", "volume": {"size": 10}, "datastore": pg_type,
            "restorePoint": {"backupRef": bid}}}))?;
        let (pitr, pitr_s) = coffer.create(json!({"instance": {"name": format!("pg-pitr-{i}"),
            "flavorRef": "3", "volume": {"size": 10}, "datastore": pg_type,
            "restorePoint": {"backupRef": bid, "restore_time": latest}}}))?;
        let root = tmp.join("instances").join(&pitr);
        let log = std::fs::read_to_string(root.join("agent.log")).unwrap_or_default();
        // How long fetching, unsealing and rebuilding the archive took (beside the recovery).
        let (fed_s, mib) = rolled_forward(&log).unwrap_or_default();
        r.mib = mib;
        r.fed.push(fed_s);
        r.replay.push((pitr_s - plain_s).max(1e-3));
        let server_log =
            std::fs::read_to_string(root.join("state/postgresql/postgres.log")).unwrap_or_default();
        // Kept beside the bench's files (which COFFER_BENCH_KEEP keeps) once the instance is gone.
        let _ = std::fs::write(tmp.join(format!("pitr-{i}-agent.log")), &log);
        let _ = std::fs::write(tmp.join(format!("pitr-{i}-postgres.log")), &server_log);
        r.redo.push(redo_elapsed(&server_log).unwrap_or(f64::NAN));
        let prows = PgAdmin::of(tmp, &pitr)?.psql("SELECT count(*) FROM big")?;
        if rows != prows {
            bail!("the restore to time holds {prows} rows, the source {rows}");
        }
        for id in [&plain, &pitr] {
            coffer.delete(id)?;
        }

        env::step(&format!(
            "round {}/{rounds}: the floor, the server's own recovery of the same WAL",
            i + 1
        ));
        let run = tmp.join("floor-run");
        let _ = std::fs::remove_dir_all(&run);
        if !Command::new("cp")
            .arg("-a")
            .arg(&floor_dir)
            .arg(&run)
            .status()?
            .success()
        {
            bail!("copying the floor's data directory failed");
        }
        let (floor_s, frows, flog) = floor_recovery(tmp, &pg.bin, &run, &settings)?;
        let _ = std::fs::remove_dir_all(&run);
        r.floor.push(floor_s);
        r.floor_redo.push(redo_elapsed(&flog).unwrap_or(f64::NAN));
        if rows != frows {
            bail!("the floor's recovery holds {frows} rows, the source {rows}");
        }
    }

    let mmm = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (rmin, rmed, rmax) = mmm(&mut r.replay);
    let (fmin, fmed, fmax) = mmm(&mut r.floor);
    let (dmin, dmed, dmax) = mmm(&mut r.redo);
    let (gmin, gmed, gmax) = mmm(&mut r.floor_redo);
    let (_, fedmed, _) = mmm(&mut r.fed);
    println!();
    println!(
        "pitr, PostgreSQL ({}), {rounds} round(s), {rows} rows",
        crate::bench::build_label(bins)
    );
    println!(
        "  replay of {:.0} MiB of WAL, Coffer: restore to time − restore as is: median {rmed:.2} s (min {rmin:.2}, max {rmax:.2})",
        r.mib
    );
    println!("  floor, the server's own recovery until it answers:  median {fmed:.2} s (min {fmin:.2}, max {fmax:.2})");
    println!(
        "  → {:.2}× the floor's speed (medians; target ≥ 0.9)",
        fmed / rmed
    );
    println!(
        "  the server's own redo time (its log's \"redo done\"): Coffer median {dmed:.2} s (min {dmin:.2}, max {dmax:.2}), floor median {gmed:.2} s (min {gmin:.2}, max {gmax:.2}) → {:.2}×",
        gmed / dmed
    );
    println!("  of which fetching, unsealing and rebuilding the archive (fed beside the recovery): median {fedmed:.2} s");
    coffer.stop();
    Ok(())
}

/// The figures of the PostgreSQL replay's rounds.
#[derive(Default)]
struct PgRounds {
    mib: f64,
    replay: Vec<f64>,
    fed: Vec<f64>,
    redo: Vec<f64>,
    floor: Vec<f64>,
    floor_redo: Vec<f64>,
}

/// The redo time a PostgreSQL server logged at the end of its recovery (`redo done at ...
/// elapsed: 3.01 s`).
fn redo_elapsed(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("redo done at"))?;
    line.split("elapsed: ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Starts a PostgreSQL server on `data` (a base with the WAL to recover in its pg_wal) with the
/// instance's memory settings, as the postgres user, until it answers; counts its rows and
/// stops it. Returns the seconds until it answered, the count and the server's log.
fn floor_recovery(
    tmp: &Path,
    bin: &str,
    data: &Path,
    (shared_buffers, max_connections): &(String, String),
) -> anyhow::Result<(f64, String, String)> {
    if !Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(data)
        .status()?
        .success()
    {
        bail!("chown of the floor's data directory failed");
    }
    let port = crate::bench::free_port().to_string();
    let sock = data.display().to_string();
    let as_pg = |tool: &str| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(format!("{bin}/{tool}"));
        c
    };
    let log_path = tmp.join("floor-postgres.log");
    let t = Instant::now();
    let mut server = as_pg("postgres")
        .arg("-D")
        .arg(data)
        .args(["-c", &format!("port={port}")])
        .args(["-c", &format!("unix_socket_directories={sock}")])
        .args(["-c", "listen_addresses="])
        // The instance's own memory settings (as its flavor renders them), nothing tuned.
        .args(["-c", &format!("shared_buffers={shared_buffers}")])
        .args(["-c", &format!("max_connections={max_connections}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let floor_s = loop {
        let ready = as_pg("pg_isready")
            .args(["-q", "-h", &sock, "-p", &port])
            .status()?
            .success();
        if ready {
            break t.elapsed().as_secs_f64();
        }
        if let Some(st) = server.try_wait()? {
            bail!("the floor's server ended ({st}); see floor-postgres.log");
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the floor's recovery did not end in 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = as_pg("psql")
        .args([
            "-h",
            &sock,
            "-p",
            &port,
            "-U",
            "coffer_admin",
            "-d",
            "postgres",
        ])
        .args(["-A", "-t", "-c"])
        .arg("SELECT count(*) FROM big")
        .output()?;
    let frows = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        eprintln!(
            "  counting the floor's rows failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let _ = as_pg("pg_ctl")
        .arg("-D")
        .arg(data)
        .args(["-m", "fast", "-w", "stop"])
        .stdout(Stdio::null())
        .status();
    let _ = server.wait();
    Ok((
        floor_s,
        frows,
        std::fs::read_to_string(&log_path).unwrap_or_default(),
    ))
}
