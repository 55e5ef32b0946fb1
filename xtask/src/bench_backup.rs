//! `cargo xtask bench backup [--size-mb N]`: on a generated dataset (default 1 GiB), side by side:
//! the floor (`mariabackup --stream | zstd -1 > file`), Trove's historical pipeline
//! (`| gzip | openssl enc -aes-256-cbc`), and Coffer's backup through the agent to local storage;
//! then restore: the floor (decompress + extract + prepare + start) against Coffer's restore into a
//! new instance. Prints MB/s, ratios and the agent's peak RSS. Figures, not assertions.

use std::path::Path;
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mb" => size_mb = it.next().context("--size-mb N")?.parse()?,
            other => bail!("unknown bench backup option '{other}' (known: --size-mb N)"),
        }
    }
    with_release("coffer-bench-backup", |tools, bins, tmp| {
        bench(tools, bins, tmp, size_mb)
    })
}

fn bench(tools: &env::Tools, bins: &Path, tmp: &Path, size_mb: u64) -> anyhow::Result<()> {
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
    let agent: i32 =
        std::fs::read_to_string(tmp.join("instances").join(&id).join("state/agent.pid"))?
            .trim()
            .parse()?;
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
    let stored = loop {
        let (_, v) = http(
            coffer.api_port,
            "GET",
            &format!("/v1.0/bench/backups/{bid}"),
            coffer.token,
            None,
        )?;
        match v["backup"]["status"].as_str() {
            Some("COMPLETED") => break v["backup"]["size"].as_f64().unwrap_or(0.0),
            Some("FAILED") => bail!("backup failed: {v}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let coffer_backup = t0.elapsed().as_secs_f64();
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

    println!("\nbench backup (data directory {mb:.0} MB, MariaDB, release build, one run each)");
    println!(
        "  floor  mariabackup | zstd -1          : {floor:.2} s  {:.0} MB/s  ({:.0} MB stored)",
        mb / floor,
        floor_size as f64 / (1 << 20) as f64
    );
    println!(
        "  trove  mariabackup | gzip | openssl   : {trove:.2} s  {:.0} MB/s",
        mb / trove
    );
    println!("  coffer backup through the agent       : {coffer_backup:.2} s  {:.0} MB/s  ({:.0} MB stored, encrypted)", mb / coffer_backup, stored * 1024.0);
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
