//! `cargo xtask bench replication [--size-mb N]`: in one run, side by side,
//! - replica creation through the API (snapshot, restore, catch-up) against its floor done by
//!   hand: `mariabackup --stream | mbstream -x`, `--prepare`, start, CHANGE MASTER, catch up;
//! - switchover: the longest gap between successful writes of a client writing every 10 ms;
//! - failover (automatic, 4 s heartbeat expiry: the least the fence bound allows with a 1 s lease): from killing the source's agent and database
//!   to the first successful write on the new source.
//!
//! Release binaries. Figures, not assertions.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::bench::{free_port, http, wait_select1, with_release, Bench, Killer};
use crate::env;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut size_mb = 256u64;
    let mut smoke = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mb" => size_mb = it.next().context("--size-mb N")?.parse()?,
            "--smoke" => (smoke, size_mb) = (true, 2),
            other => {
                bail!("unknown bench replication option '{other}' (known: --size-mb N, --smoke)")
            }
        }
    }
    with_release("coffer-bench-replication", smoke, |tools, bins, tmp| {
        bench(tools, bins, tmp, size_mb)
    })
}

pub(crate) fn get(b: &Bench, id: &str) -> anyhow::Result<Value> {
    Ok(http(
        b.api_port,
        "GET",
        &format!("/v1.0/bench/instances/{id}"),
        b.token,
        None,
    )?
    .1["instance"]
        .clone())
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !f()? {
        if t0.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `mariadb --defaults-file=admin.cnf -N -e sql` on an instance; returns stdout.
pub(crate) fn sql(root: &Path, q: &str) -> anyhow::Result<String> {
    let out = Command::new("mariadb")
        .arg(format!(
            "--defaults-file={}",
            root.join("admin.cnf").display()
        ))
        .args(["-N", "-B", "-e", q])
        .output()?;
    if !out.status.success() {
        bail!("{q}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A client writing one row every 10 ms to whichever endpoint takes it; records the instants
/// of successful writes.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Instant>>>,
    handle: std::thread::JoinHandle<()>,
}

fn writer(ports: Vec<u16>, password: String, first: u64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (s, a) = (stop.clone(), acked.clone());
    let handle = std::thread::spawn(move || {
        let mut cur = 0;
        let mut i = first;
        while !s.load(Ordering::Relaxed) {
            let ok = Command::new("mariadb")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-P",
                    &ports[cur].to_string(),
                    "-u",
                    "app",
                ])
                .env("MYSQL_PWD", &password)
                .args(["--connect-timeout=1", "shop", "-e"])
                .arg(format!("INSERT INTO w VALUES ({i})"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|st| st.success())
                .unwrap_or(false);
            if ok {
                a.lock().unwrap().push(Instant::now());
                i += 1;
            } else {
                cur = (cur + 1) % ports.len();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Writer {
        stop,
        acked,
        handle,
    }
}

impl Writer {
    fn finish(self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        let v = self.acked.lock().unwrap().clone();
        v
    }
}

fn longest_gap(t: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut v: Vec<Instant> = t
        .iter()
        .copied()
        .filter(|x| *x >= from && *x <= to)
        .collect();
    v.insert(0, from);
    v.push(to);
    v.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

fn bench(tools: &env::Tools, bins: &Path, tmp: &Path, size_mb: u64) -> anyhow::Result<()> {
    let keyring = tmp.join("keyring.toml");
    let key: String = (0..32)
        .map(|i| format!("{:02x}", (i * 29 + 7) as u8))
        .collect();
    std::fs::write(
        &keyring,
        format!("current = \"k1\"\n[keys]\nk1 = \"{key}\"\n"),
    )?;
    let extra = format!(
        "heartbeat_expiry_s = 4\nlease_ms = 1000\nrespawn_agents = false\n\
         [replication]\nauto_failover = true\n\
         [backup]\nkeyring_file = {:?}\n[backup.storage]\nkind = \"local\"\nroot = {:?}\n",
        keyring.display().to_string(),
        tmp.join("backups").display().to_string()
    );
    let coffer = Bench::start_with(tools, bins, tmp, &extra, "heartbeat_interval_ms = 500\n")?;
    let password = "bench-App-pw1".to_string();
    let (src, _) = coffer.create(
        json!({"instance": {"name": "src", "flavorRef": "3", "volume": {"size": 20},
        "databases": [{"name": "shop"}],
        "users": [{"name": "app", "password": password, "databases": [{"name": "shop"}]}]}}),
    )?;
    let root_of = |id: &str| tmp.join("instances").join(id).join("state/mariadb");
    let sroot = root_of(&src);
    env::step(&format!("generating about {size_mb} MB of data"));
    sql(&sroot, "CREATE TABLE shop.w (i BIGINT PRIMARY KEY); CREATE TABLE shop.t (id BIGINT AUTO_INCREMENT PRIMARY KEY, b VARCHAR(1000)); \
                 INSERT INTO shop.t (b) VALUES (CONCAT(SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512)))")?;
    let data = sroot.join("data");
    let du = |p: &Path| -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| match e.file_type() {
                            Ok(t) if t.is_dir() => walk(&e.path()),
                            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(p)
    };
    while du(&data) < size_mb << 20 {
        sql(&sroot, "INSERT INTO shop.t (b) SELECT CONCAT(SHA2(RAND(), 512), SHA2(RAND(), 512), SHA2(RAND(), 512)) FROM shop.t LIMIT 200000")?;
    }
    let mb = du(&data) as f64 / (1 << 20) as f64;
    eprintln!("  data directory: {mb:.0} MB");

    // Floor: a replica by hand.
    env::step("floor: mariabackup | mbstream, prepare, start, CHANGE MASTER, catch up");
    sql(&sroot, "CREATE USER IF NOT EXISTS bench_repl@'%' IDENTIFIED BY 'bench-repl-pw'; GRANT REPLICATION SLAVE ON *.* TO bench_repl@'%'")?;
    let fdir = tmp.join("floor-replica");
    std::fs::create_dir_all(fdir.join("tmp"))?;
    let sport = get(&coffer, &src)?["port"].as_u64().unwrap_or(0);
    std::fs::create_dir_all(fdir.join("w"))?;
    std::fs::create_dir_all(fdir.join("data"))?;
    let admin_pw = crate::bench::mariabackup_creds(&sroot, &sroot.join("mb.cnf"))?;
    let t0 = Instant::now();
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(format!(
            "mariabackup --defaults-file={admin} --backup --stream=xbstream --datadir={data} --target-dir={w} 2>/dev/null | mbstream -x -C {d} && \
             mariabackup --prepare --target-dir={d} 2>/dev/null",
            admin = sroot.join("mb.cnf").display(),
            data = data.display(),
            w = fdir.join("w").display(),
            d = fdir.join("data").display(),
        ))
        .status()?;
    if !st.success() {
        bail!("the floor's backup/prepare failed");
    }
    let fport = free_port();
    let cnf = crate::bench::floor_cnf(
        &std::fs::read_to_string(sroot.join("my.cnf"))?,
        &sroot.display().to_string(),
        &fdir,
        &[
            ("port", fport.to_string()),
            ("server_id", "999".into()),
            ("socket", fdir.join("s.sock").display().to_string()),
        ],
    );
    std::fs::write(fdir.join("my.cnf"), cnf)?;
    let child = Command::new("/usr/sbin/mariadbd")
        .arg(format!("--defaults-file={}", fdir.join("my.cnf").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _floor = Killer(vec![child]);
    wait_select1(&fdir.join("s.sock"), t0, Duration::from_secs(120))?;
    let gtid = std::fs::read_to_string(fdir.join("data/xtrabackup_binlog_info"))
        .unwrap_or_default()
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    let fsql = |q: &str| -> anyhow::Result<String> {
        let out = Command::new("mariadb")
            .args(["-S"])
            .arg(fdir.join("s.sock"))
            .args(["-u", "coffer_admin"])
            .env("MYSQL_PWD", &admin_pw)
            .args(["-N", "-B", "-e", q])
            .output()?;
        if !out.status.success() {
            bail!("{q}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    fsql(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}'; CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={sport}, \
         MASTER_USER='bench_repl', MASTER_PASSWORD='bench-repl-pw', MASTER_USE_GTID=slave_pos; START SLAVE"
    ))?;
    let target = sql(&sroot, "SELECT @@GLOBAL.gtid_binlog_pos")?;
    fsql(&format!("SELECT MASTER_GTID_WAIT('{target}', 300)"))?;
    let floor_replica = t0.elapsed().as_secs_f64();
    drop(_floor);

    // Coffer: a replica through the API, until it has caught up with the source.
    env::step("Coffer: POST /instances with replica_of until ACTIVE and caught up");
    let t0 = Instant::now();
    let (st, v) = http(
        coffer.api_port,
        "POST",
        "/v1.0/bench/instances",
        coffer.token,
        Some(&json!({"instance": {"name": "rep", "replica_of": src}})),
    )?;
    if st != 200 {
        bail!("replica create failed: {st} {v}");
    }
    let rep = v["instance"]["id"].as_str().unwrap_or_default().to_string();
    let target = sql(&sroot, "SELECT @@GLOBAL.gtid_binlog_pos")?;
    wait_for("replica ACTIVE", Duration::from_secs(1800), || {
        let r = get(&coffer, &rep)?;
        if r["status"] == "ERROR" {
            bail!("the replica went to ERROR: {r}");
        }
        Ok(r["status"] == "ACTIVE")
    })?;
    sql(
        &root_of(&rep),
        &format!("SELECT MASTER_GTID_WAIT('{target}', 300)"),
    )?;
    let coffer_replica = t0.elapsed().as_secs_f64();

    // Switchover under a writer.
    env::step("switchover under a client writing every 10 ms");
    let rport = get(&coffer, &rep)?["port"].as_u64().unwrap_or(0) as u16;
    let w = writer(vec![sport as u16, rport], password.clone(), 0);
    std::thread::sleep(Duration::from_secs(2));
    let t_promote = Instant::now();
    let (st, v) = http(
        coffer.api_port,
        "POST",
        &format!("/v1.0/bench/instances/{rep}/action"),
        coffer.token,
        Some(&json!({"promote_to_replica_source": {}})),
    )?;
    if st != 202 {
        bail!("promote failed: {st} {v}");
    }
    wait_for("switchover", Duration::from_secs(120), || {
        let r = get(&coffer, &rep)?;
        let s = get(&coffer, &src)?;
        Ok(r["status"] == "ACTIVE" && r.get("replica_of").is_none() && s["status"] == "ACTIVE")
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let t_end = Instant::now();
    let acked = w.finish();
    let gap = longest_gap(&acked, t_promote - Duration::from_secs(1), t_end);

    // Failover: kill the (new) source's agent and database; automatic eject.
    env::step(
        "failover: kill the source's agent and database (4 s heartbeat expiry, auto failover)",
    );
    let new_source = rep.clone();
    let nroot = tmp.join("instances").join(&new_source);
    let agent_pid: i32 = std::fs::read_to_string(nroot.join("state/agent.pid"))?
        .trim()
        .parse()?;
    let db_pid: i32 =
        serde_json::from_str::<Value>(&std::fs::read_to_string(nroot.join("state/db.json"))?)?
            ["pid"]
            .as_i64()
            .unwrap_or(0) as i32;
    let w = writer(vec![sport as u16], password, 1_000_000_000);
    std::thread::sleep(Duration::from_millis(500));
    let t_kill = Instant::now();
    for p in [agent_pid, db_pid] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut first_write = None;
    let waited = wait_for("a write on the new source", Duration::from_secs(60), || {
        first_write = w
            .acked
            .lock()
            .unwrap()
            .iter()
            .copied()
            .find(|t| *t > t_kill);
        Ok(first_write.is_some())
    });
    if let Err(e) = waited {
        let log = std::fs::read_to_string(tmp.join("controller.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "{e}; the controller's log ends with:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    let failover = first_write.map(|t| t - t_kill).unwrap_or_default();
    let _ = w.finish();
    coffer.stop();

    println!();
    let build = crate::bench::build_label(bins);
    println!("bench replication (data directory {mb:.0} MB, MariaDB, {build}, one run each)");
    println!("  floor  replica by hand (backup | extract, prepare, start, catch up) : {floor_replica:.2} s");
    println!("  coffer replica through the API (snapshot, encrypted, restore, catch up) : {coffer_replica:.2} s");
    println!(
        "  ratio coffer / floor replica creation time : {:.2}",
        coffer_replica / floor_replica
    );
    println!(
        "  switchover: longest gap between successful writes : {:.2} s  (target < 2 s)",
        gap.as_secs_f64()
    );
    println!("  failover: kill → first write on the new source : {:.2} s  (target < 10 s; heartbeat expiry 4 s)", failover.as_secs_f64());
    Ok(())
}
