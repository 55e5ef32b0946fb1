//! `cargo xtask bench backup [--size-mb N] [--datastore mariadb|postgresql|redis|all]`: on a
//! generated dataset (default 1 GiB; Redis at most half the flavor's memory), side by side:
//! - MariaDB: the floor (`mariabackup --stream | zstd -1 > file`), Trove's historical pipeline
//!   (`| gzip | openssl enc -aes-256-cbc`), Coffer's backup through the agent to local storage;
//!   then restore: the floor (decompress + extract + prepare + start) against Coffer's restore
//!   into a new instance.
//! - PostgreSQL: the floor (`pg_basebackup -Ft -X fetch | zstd -1 > file`), pgBackRest (Debian's
//!   package, a local repository, zstd 1 and AES-256 like Coffer) as a peer, Coffer's backup and
//!   its restore to ACTIVE.
//! - Redis: the floor (`BGSAVE`, wait, copy `dump.rdb`), Coffer's backup and its restore.
//!
//! Prints MB/s, ratios and the agent's peak RSS. Figures, not assertions.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::bench::{free_port, http, wait_select1, with_release, Bench, Killer};
use crate::env;

fn sh(script: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .status()?;
    if !st.success() {
        bail!("command failed ({st}): {script}");
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn du(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn peak_rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut size_mb = 1024u64;
    let mut which = "all".to_string();
    let mut smoke = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mb" => size_mb = it.next().context("--size-mb N")?.parse()?,
            "--datastore" => which = it.next().context("--datastore NAME")?.clone(),
            "--smoke" => (smoke, size_mb) = (true, 2),
            other => bail!(
                "unknown bench backup option '{other}' (known: --size-mb N, --datastore mariadb|postgresql|redis|all, --smoke)"
            ),
        }
    }
    if !["all", "mariadb", "postgresql", "redis"].contains(&which.as_str()) {
        bail!("--datastore takes mariadb, postgresql, redis or all");
    }
    with_release("coffer-bench-backup", smoke, |tools, bins, tmp| {
        let run = |name: &str| which == "all" || which == name;
        if run("mariadb") {
            let dir = tmp.join("mariadb");
            std::fs::create_dir_all(&dir)?;
            bench(tools, bins, &dir, size_mb)?;
        }
        if run("postgresql") {
            let dir = tmp.join("postgresql");
            std::fs::create_dir_all(&dir)?;
            bench_postgresql(tools, bins, &dir, size_mb)?;
        }
        if run("redis") {
            let dir = tmp.join("redis");
            std::fs::create_dir_all(&dir)?;
            bench_redis(tools, bins, &dir, size_mb)?;
        }
        Ok(())
    })
}

/// A keyring file and the `[backup]` section for a benchmark's controller.
pub(crate) fn backup_config(tmp: &Path) -> anyhow::Result<(String, String)> {
    let keyring = tmp.join("keyring.toml");
    let key: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + 11) as u8))
        .collect();
    std::fs::write(
        &keyring,
        format!("current = \"k1\"\n[keys]\nk1 = \"{key}\"\n"),
    )?;
    let extra = format!(
        "[backup]\nkeyring_file = {:?}\n[backup.storage]\nkind = \"local\"\nroot = {:?}\n",
        keyring.display().to_string(),
        tmp.join("backups").display().to_string()
    );
    Ok((key, extra))
}

/// Coffer's backup of `id` through the agent: (seconds, stored MB, backup id).
pub(crate) fn coffer_backup(coffer: &Bench, id: &str) -> anyhow::Result<(f64, f64, String)> {
    let t0 = Instant::now();
    let (st, v) = http(
        coffer.api_port,
        "POST",
        "/v1.0/bench/backups",
        coffer.token,
        Some(&json!({"backup": {"name": "b", "instance": id}})),
    )?;
    if st != 202 {
        bail!("backup create failed: {st} {v}");
    }
    let bid = v["backup"]["id"].as_str().unwrap_or_default().to_string();
    loop {
        let (_, v) = http(
            coffer.api_port,
            "GET",
            &format!("/v1.0/bench/backups/{bid}"),
            coffer.token,
            None,
        )?;
        match v["backup"]["status"].as_str() {
            Some("COMPLETED") => {
                let gb = v["backup"]["size"].as_f64().unwrap_or(0.0);
                return Ok((t0.elapsed().as_secs_f64(), gb * 1024.0, bid));
            }
            Some("FAILED") => bail!("backup failed: {v}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn agent_pid(tmp: &Path, id: &str) -> anyhow::Result<i32> {
    Ok(
        std::fs::read_to_string(tmp.join("instances").join(id).join("state/agent.pid"))?
            .trim()
            .parse()?,
    )
}

/// A Coffer PostgreSQL instance's server, reached as its admin with `psql`.
pub(crate) struct PgAdmin {
    pub root: PathBuf,
    pub port: String,
    pub socket_dir: String,
    pub password: String,
    /// The server's tools.
    pub bin: String,
}

impl PgAdmin {
    pub(crate) fn of(tmp: &Path, id: &str) -> anyhow::Result<PgAdmin> {
        let root = tmp.join("instances").join(id).join("state/postgresql");
        let password = std::fs::read_to_string(root.join("admin.password"))?
            .trim()
            .to_string();
        let bin = crate::env::postgresql()
            .map(|(_, bin)| bin.display().to_string())
            .context("PostgreSQL is installed")?;
        let mut pg = PgAdmin {
            port: String::new(),
            socket_dir: String::new(),
            root,
            password,
            bin,
        };
        pg.port = pg.setting("port")?;
        pg.socket_dir = pg.setting("unix_socket_directories")?;
        Ok(pg)
    }

    /// A setting of the instance's rendered `postgresql.conf` (empty when it sets none).
    pub(crate) fn setting(&self, name: &str) -> anyhow::Result<String> {
        let conf = std::fs::read_to_string(self.root.join("postgresql.conf"))?;
        Ok(conf
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or("")
            .trim_matches('\'')
            .to_string())
    }

    /// Runs `sql` as the admin (its password in the command's environment); returns what it
    /// printed (unaligned, tuples only).
    pub(crate) fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(format!("{}/psql", self.bin))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port,
                "-U",
                "coffer_admin",
                "-d",
                "postgres",
            ])
            .args(["-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()?;
        if !out.status.success() {
            bail!(
                "psql -c failed: {sql}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn bench_postgresql(
    tools: &env::Tools,
    bins: &Path,
    tmp: &Path,
    size_mb: u64,
) -> anyhow::Result<()> {
    let (_, extra) = backup_config(tmp)?;
    let coffer = Bench::start(tools, bins, tmp, &extra)?;
    let (id, _) = coffer.create(json!({"instance": {"name": "pg", "flavorRef": "3",
        "volume": {"size": 20}, "datastore": {"type": "postgresql"}}}))?;
    let pg = PgAdmin::of(tmp, &id)?;
    let data = pg.root.join("data");
    let (port, socket_dir, password, pg_bin) = (&pg.port, &pg.socket_dir, &pg.password, &pg.bin);
    let psql = |sql: &str| pg.psql(sql).map(|_| ());
    env::step(&format!("generating about {size_mb} MB of data"));
    psql("CREATE TABLE t (id bigserial PRIMARY KEY, a text, b text)")?;
    while du(&data) < size_mb << 20 {
        // Hex digests: about as compressible as real rows (2:1), unlike repeated strings.
        psql(
            "INSERT INTO t (a, b) SELECT md5(random()::text), md5(random()::text) || md5(random()::text) \
             || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) \
             || md5(random()::text) || md5(random()::text) FROM generate_series(1, 300000)",
        )?;
    }
    psql("CHECKPOINT")?;
    let bytes = du(&data);
    let mb = bytes as f64 / (1 << 20) as f64;
    eprintln!("  data directory: {mb:.0} MB");

    env::step("floor: pg_basebackup -Ft -X fetch | zstd -1 > file");
    let floor_file = tmp.join("floor.tar.zst");
    let t0 = Instant::now();
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(format!(
            "{pg_bin}/pg_basebackup -h 127.0.0.1 -p {port} -U coffer_admin -D - -Ft -X fetch --checkpoint=fast | zstd -1 -q > {}",
            floor_file.display()
        ))
        .env("PGPASSWORD", password)
        .status()?;
    if !st.success() {
        bail!("the pg_basebackup floor failed");
    }
    let floor = t0.elapsed().as_secs_f64();
    let floor_size = std::fs::metadata(&floor_file)?.len() as f64 / (1 << 20) as f64;

    let pgbr = pgbackrest(tmp, &data, port, socket_dir, password);
    if let Err(e) = &pgbr {
        eprintln!("  pgBackRest peer skipped: {e:#}");
    }

    env::step("Coffer: POST /backups until COMPLETED");
    let agent = agent_pid(tmp, &id)?;
    let (cb, stored, bid) = coffer_backup(&coffer, &id)?;
    let agent_peak = peak_rss_kb(agent);
    env::step("Coffer restore: POST /instances with restorePoint until ACTIVE");
    let (_, cr) = coffer.create(json!({"instance": {"name": "restored", "flavorRef": "3",
        "volume": {"size": 20}, "datastore": {"type": "postgresql"}, "restorePoint": {"backupRef": bid}}}))?;

    let build = crate::bench::build_label(bins);
    println!("\nbench backup (data directory {mb:.0} MB, PostgreSQL, {build}, one run each)");
    println!("  floor  pg_basebackup -Ft | zstd -1     : {floor:.2} s  {:.0} MB/s  ({floor_size:.0} MB stored)", mb / floor);
    if let Ok((t, size)) = pgbr {
        println!(
            "  peer   pgBackRest (zst 1, aes-256-cbc): {t:.2} s  {:.0} MB/s  ({size:.0} MB stored)",
            mb / t
        );
        println!("  ratio coffer / pgBackRest throughput  : {:.2}", t / cb);
    }
    println!("  coffer backup through the agent       : {cb:.2} s  {:.0} MB/s  ({stored:.0} MB stored, encrypted)", mb / cb);
    println!(
        "  ratio coffer / floor throughput       : {:.2}  (target >= 0.9)",
        floor / cb
    );
    println!(
        "  coffer restore to ACTIVE              : {cr:.2} s  {:.0} MB/s",
        mb / cr
    );
    println!(
        "  agent peak RSS (whole life)           : {:.1} MB",
        agent_peak as f64 / 1024.0
    );
    coffer.stop();
    Ok(())
}

/// pgBackRest (installed from Debian's packages when missing) backing the instance up into a
/// local repository, as the server's user: (seconds, stored MB).
fn pgbackrest(
    tmp: &Path,
    data: &Path,
    port: &str,
    socket_dir: &str,
    password: &str,
) -> anyhow::Result<(f64, f64)> {
    if !env::have("pgbackrest") {
        env::apt_install(&["pgbackrest"])?;
    }
    let dir = tmp.join("pgbackrest");
    for d in ["repo", "log", "lock", "spool"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let conf = dir.join("pgbackrest.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-path={repo}\nrepo1-retention-full=1\nrepo1-cipher-type=aes-256-cbc\n\
             repo1-cipher-pass=bench-cipher-pass\ncompress-type=zst\ncompress-level=1\nstart-fast=y\n\
             archive-check=n\nlog-level-console=warn\nlog-path={log}\nlock-path={lock}\nspool-path={spool}\n\
             [bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={socket_dir}\npg1-user=coffer_admin\n",
            repo = dir.join("repo").display(),
            log = dir.join("log").display(),
            lock = dir.join("lock").display(),
            spool = dir.join("spool").display(),
            data = data.display(),
        ),
    )?;
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let st = Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbackrest"])
            .arg(format!("--config={}", conf.display()))
            .arg("--stanza=bench")
            .args(args)
            .env("PGPASSWORD", password)
            .status()?;
        if !st.success() {
            bail!("pgbackrest {} failed", args.join(" "));
        }
        Ok(())
    };
    env::step("peer: pgBackRest stanza-create, backup --type=full");
    run(&["stanza-create"])?;
    let t0 = Instant::now();
    run(&["backup", "--type=full"])?;
    let t = t0.elapsed().as_secs_f64();
    Ok((t, du(&dir.join("repo")) as f64 / (1 << 20) as f64))
}

fn bench_redis(tools: &env::Tools, bins: &Path, tmp: &Path, size_mb: u64) -> anyhow::Result<()> {
    let (_, extra) = backup_config(tmp)?;
    let coffer = Bench::start(tools, bins, tmp, &extra)?;
    let (id, _) = coffer.create(json!({"instance": {"name": "redis", "flavorRef": "3",
        "volume": {"size": 20}, "datastore": {"type": "redis"}}}))?;
    let root = tmp.join("instances").join(&id).join("state/redis");
    let password = std::fs::read_to_string(root.join("admin.password"))?
        .trim()
        .to_string();
    let conf = std::fs::read_to_string(root.join("redis.conf"))?;
    let port = conf
        .lines()
        .find_map(|l| l.strip_prefix("port "))
        .context("the rendered port")?
        .trim()
        .to_string();
    let maxmemory_mb: u64 = conf
        .lines()
        .find_map(|l| l.strip_prefix("maxmemory "))
        .and_then(|v| v.trim().trim_end_matches("mb").parse().ok())
        .unwrap_or(512);
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "--user",
                "coffer_admin",
                "--no-auth-warning",
            ])
            .args(args)
            .env("REDISCLI_AUTH", &password)
            .output()?;
        if !out.status.success() {
            bail!("redis-cli {} failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Keys and their overhead must fit the flavor's maxmemory (noeviction).
    let target_mb = size_mb.min(maxmemory_mb * 6 / 10);
    env::step(&format!("generating about {target_mb} MB of keys"));
    let per_batch = 100_000u64;
    let value_len = 320u64;
    let batches = (target_mb << 20) / (per_batch * value_len);
    for b in 0..batches.max(1) {
        // Hex digests: about as compressible as real values.
        cli(&[
            "EVAL",
            "for i = 1, tonumber(ARGV[2]) do local k = ARGV[1] .. ':' .. i; \
             local h = redis.sha1hex(k); \
             redis.call('SET', k, string.rep(h, 4) .. redis.sha1hex(h) .. redis.sha1hex(h .. 'x') .. \
             redis.sha1hex(h .. 'y') .. redis.sha1hex(h .. 'z')) end return 1",
            "0",
            &format!("b{b}"),
            &per_batch.to_string(),
        ])?;
    }
    let info = cli(&["INFO", "memory"])?;
    let used: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
        / (1 << 20) as f64;
    eprintln!("  dataset: {used:.0} MB in memory");

    env::step("floor: BGSAVE, wait, cp dump.rdb");
    let saves = |s: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix("rdb_saves:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = saves(&cli(&["INFO", "persistence"])?);
    let t0 = Instant::now();
    cli(&["BGSAVE"])?;
    loop {
        let p = cli(&["INFO", "persistence"])?;
        if saves(&p) > before && p.contains("rdb_bgsave_in_progress:0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sh(&format!(
        "cp {} {}",
        root.join("data/dump.rdb").display(),
        tmp.join("floor.rdb").display()
    ))?;
    let floor = t0.elapsed().as_secs_f64();
    let rdb_mb = std::fs::metadata(tmp.join("floor.rdb"))?.len() as f64 / (1 << 20) as f64;

    env::step("Coffer: POST /backups until COMPLETED");
    let agent = agent_pid(tmp, &id)?;
    let (cb, stored, bid) = coffer_backup(&coffer, &id)?;
    let agent_peak = peak_rss_kb(agent);
    env::step("Coffer restore: POST /instances with restorePoint until ACTIVE");
    let (_, cr) = coffer.create(json!({"instance": {"name": "restored", "flavorRef": "3",
        "volume": {"size": 20}, "datastore": {"type": "redis"}, "restorePoint": {"backupRef": bid}}}))?;

    let build = crate::bench::build_label(bins);
    println!("\nbench backup (dataset {used:.0} MB in memory, RDB {rdb_mb:.0} MB, Redis, {build}, one run each)");
    println!(
        "  floor  BGSAVE + cp dump.rdb           : {floor:.2} s  {:.0} MB/s (of RDB)",
        rdb_mb / floor
    );
    println!("  coffer backup through the agent       : {cb:.2} s  {:.0} MB/s  ({stored:.0} MB stored, encrypted)", rdb_mb / cb);
    println!(
        "  ratio coffer / floor throughput       : {:.2}  (target >= 0.9)",
        floor / cb
    );
    println!(
        "  coffer restore to ACTIVE              : {cr:.2} s  {:.0} MB/s (of RDB)",
        rdb_mb / cr
    );
    println!(
        "  agent peak RSS (whole life)           : {:.1} MB",
        agent_peak as f64 / 1024.0
    );
    coffer.stop();
    Ok(())
}

fn bench(tools: &env::Tools, bins: &Path, tmp: &Path, size_mb: u64) -> anyhow::Result<()> {
    let (key, extra) = backup_config(tmp)?;
    let coffer = Bench::start(tools, bins, tmp, &extra)?;
    let (id, _) = coffer
        .create(json!({"instance": {"name": "big", "flavorRef": "3", "volume": {"size": 20}}}))?;
    let root = tmp.join("instances").join(&id).join("state/mariadb");
    let admin = root.join("admin.cnf");
    let data = root.join("data");

    env::step(&format!("generating about {size_mb} MB of data"));
    let client = |sql: &str| -> anyhow::Result<()> {
        let st = Command::new("mariadb")
            .arg(format!("--defaults-file={}", admin.display()))
            .args(["-e", sql])
            .status()?;
        if !st.success() {
            bail!("mariadb -e failed: {sql}");
        }
        Ok(())
    };
    client("CREATE DATABASE bench; CREATE TABLE bench.t (id BIGINT AUTO_INCREMENT PRIMARY KEY, a CHAR(32), b VARCHAR(1000)); \
            INSERT INTO bench.t (a, b) VALUES (MD5(RAND()), CONCAT(SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512)))")?;
    while du(&data) < size_mb << 20 {
        // Hex digests: about as compressible as real rows (2:1), unlike repeated strings.
        client(
            "INSERT INTO bench.t (a, b) SELECT MD5(RAND()), CONCAT(SHA2(RAND(), 512), SHA2(RAND(), 512), \
             SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512)) FROM bench.t LIMIT 200000",
        )?;
    }
    // Let the dirty pages flush so every run copies about the same redo.
    client("SET GLOBAL innodb_max_dirty_pages_pct = 0")?;
    std::thread::sleep(Duration::from_secs(10));
    let bytes = du(&data);
    let mb = bytes as f64 / (1 << 20) as f64;
    eprintln!("  data directory: {mb:.0} MB");

    // The tools' credentials come from a 0600 defaults file, as the agent does it.
    let creds = tmp.join("mb.cnf");
    crate::bench::mariabackup_creds(&root, &creds)?;
    let mb_cmd = |work: &str| {
        format!(
            "mariabackup --defaults-file={} --backup --stream=xbstream --datadir={} --target-dir={} 2>/dev/null",
            creds.display(),
            data.display(),
            tmp.join(work).display()
        )
    };
    env::step("floor: mariabackup --stream | zstd -1 > file");
    std::fs::create_dir_all(tmp.join("w1"))?;
    let floor = sh(&format!(
        "{} | zstd -1 -q > {}",
        mb_cmd("w1"),
        tmp.join("floor.xb.zst").display()
    ))?;
    let floor_size = std::fs::metadata(tmp.join("floor.xb.zst"))?.len();
    env::step("Trove's pipeline: mariabackup --stream | gzip | openssl enc -aes-256-cbc");
    std::fs::create_dir_all(tmp.join("w2"))?;
    std::fs::write(tmp.join("trove.key"), &key)?;
    let trove = sh(&format!(
        "{} | gzip | openssl enc -aes-256-cbc -salt -pbkdf2 -pass file:{} > {}",
        mb_cmd("w2"),
        tmp.join("trove.key").display(),
        tmp.join("trove.xb.gz.enc").display()
    ))?;
    let _ = std::fs::remove_file(tmp.join("trove.xb.gz.enc"));

    env::step("Coffer: POST /backups until COMPLETED");
    let agent = agent_pid(tmp, &id)?;
    let (coffer_backup, stored, bid) = self::coffer_backup(&coffer, &id)?;
    let agent_peak = peak_rss_kb(agent);

    env::step("floor restore: zstd -d | mbstream -x, mariabackup --prepare, start until SELECT 1");
    let rdir = tmp.join("floor-restore");
    std::fs::create_dir_all(rdir.join("data"))?;
    let t0 = Instant::now();
    sh(&format!(
        "zstd -d -q -c {} | mbstream -x -C {} && mariabackup --prepare --target-dir={} 2>/dev/null",
        tmp.join("floor.xb.zst").display(),
        rdir.join("data").display(),
        rdir.join("data").display()
    ))?;
    let port = free_port();
    let cnf = crate::bench::floor_cnf(
        &std::fs::read_to_string(root.join("my.cnf"))?,
        &root.display().to_string(),
        &rdir,
        &[
            ("port", port.to_string()),
            ("socket", rdir.join("s.sock").display().to_string()),
        ],
    );
    std::fs::create_dir_all(rdir.join("tmp"))?;
    std::fs::write(rdir.join("my.cnf"), cnf)?;
    let child = Command::new("/usr/sbin/mariadbd")
        .arg(format!("--defaults-file={}", rdir.join("my.cnf").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _k = Killer(vec![child]);
    wait_select1(&rdir.join("s.sock"), t0, Duration::from_secs(600))?;
    let floor_restore = t0.elapsed().as_secs_f64();
    drop(_k);

    env::step("Coffer restore: POST /instances with restorePoint until ACTIVE");
    let (_, coffer_restore) = coffer.create(json!({"instance": {"name": "restored", "flavorRef": "3", "volume": {"size": 20}, "restorePoint": {"backupRef": bid}}}))?;

    let build = crate::bench::build_label(bins);
    println!("\nbench backup (data directory {mb:.0} MB, MariaDB, {build}, one run each)");
    println!(
        "  floor  mariabackup | zstd -1          : {floor:.2} s  {:.0} MB/s  ({:.0} MB stored)",
        mb / floor,
        floor_size as f64 / (1 << 20) as f64
    );
    println!(
        "  trove  mariabackup | gzip | openssl   : {trove:.2} s  {:.0} MB/s",
        mb / trove
    );
    println!("  coffer backup through the agent       : {coffer_backup:.2} s  {:.0} MB/s  ({stored:.0} MB stored, encrypted)", mb / coffer_backup);
    println!(
        "  ratio coffer / floor throughput       : {:.2}  (target >= 0.9)",
        floor / coffer_backup
    );
    println!(
        "  ratio coffer / trove throughput       : {:.2}  (target >= 2)",
        trove / coffer_backup
    );
    println!(
        "  floor restore (+ prepare + start)     : {floor_restore:.2} s  {:.0} MB/s",
        mb / floor_restore
    );
    println!(
        "  coffer restore to ACTIVE              : {coffer_restore:.2} s  {:.0} MB/s",
        mb / coffer_restore
    );
    println!(
        "  ratio coffer / floor restore          : {:.2}  (target >= 0.9)",
        floor_restore / coffer_restore
    );
    println!(
        "  agent peak RSS (whole life)           : {:.1} MB",
        agent_peak as f64 / 1024.0
    );
    coffer.stop();
    Ok(())
}
