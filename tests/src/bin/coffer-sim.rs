//! `coffer-sim bench`: the control plane at fleet size, with simulated agents
//! ([`coffer_tests::sim`]) against one controller on SQLite and two on PostgreSQL. For each fleet
//! size it prints the controllers' CPU and memory, heartbeat reply latency, store writes, how
//! long 100 agents killed at once take to be seen lost (against the configured expiry) and the
//! latency of `GET /instances?limit=100`, and how long restarts of 50 instances take through the
//! API (intent posted, taken by the simulated agent from its own consumer, done → ACTIVE).
//! `cargo xtask bench scale` runs it on release binaries;
//! `--smoke` runs a tiny fleet once (the test suite does, so the bench cannot rot).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coffer_tests::sim::percentile;
use coffer_tests::{Env, Opts, StatusCode};

struct Args {
    agents: Vec<usize>,
    seconds: u64,
    interval_ms: u64,
    kill: usize,
    /// How many agents take intents (each through a durable consumer of its own); None: all.
    intents: Option<usize>,
    restarts: usize,
    setups: Vec<(bool, usize)>,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        agents: vec![1000, 5000, 10000],
        seconds: 20,
        interval_ms: 2000,
        kill: 100,
        intents: None,
        restarts: 50,
        setups: vec![(false, 1), (true, 2)],
    };
    let mut it = std::env::args().skip(1);
    match it.next().as_deref() {
        Some("bench") => {}
        _ => bail!("usage: coffer-sim bench [--agents 1000,5000,10000] [--seconds S] [--interval-ms MS] [--kill N] [--intents N] [--restarts N] [--only sqlite|postgres] [--smoke]"),
    }
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--agents" => {
                a.agents = val()?
                    .split(',')
                    .map(|n| n.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => a.seconds = val()?.parse()?,
            "--interval-ms" => a.interval_ms = val()?.parse()?,
            "--kill" => a.kill = val()?.parse()?,
            "--intents" => a.intents = Some(val()?.parse()?),
            "--restarts" => a.restarts = val()?.parse()?,
            "--only" => {
                let only = val()?;
                a.setups = match only.as_str() {
                    "sqlite" => vec![(false, 1)],
                    "postgres" => vec![(true, 2)],
                    o => bail!("--only sqlite|postgres, not {o}"),
                }
            }
            "--smoke" => {
                a.agents = vec![40];
                a.seconds = 2;
                a.interval_ms = 500;
                a.kill = 5;
                a.restarts = 5;
            }
            o => bail!("unknown option {o}"),
        }
    }
    Ok(a)
}

fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn rss_mb(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Bytes the process caused to be written to storage (SQLite's files and the log).
fn disk_bytes(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("write_bytes:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Rows the PostgreSQL store wrote so far (inserted + updated + deleted).
async fn pg_rows_written(env: &Env) -> u64 {
    let v = env
        .store_text(
            "SELECT CAST(tup_inserted + tup_updated + tup_deleted AS TEXT) FROM pg_stat_database WHERE datname = $1",
            "coffer",
        )
        .await;
    v.parse().unwrap_or(0)
}

struct Row {
    agents: usize,
    setup: String,
    cpu: Vec<f64>,
    rss: Vec<f64>,
    hb: (f64, f64, usize),
    answered: f64,
    writes: String,
    detect: (f64, f64),
    list: (f64, f64),
    /// Intent posted → delivered to its agent (ms), and restart through the API → ACTIVE (s).
    delivery: (f64, f64),
    restart: (f64, f64),
}

async fn run_one(a: &Args, postgres: bool, controllers: usize, n: usize) -> anyhow::Result<Row> {
    let opts = Opts {
        store_postgres: postgres,
        ..Opts::default()
    };
    let expiry = opts.heartbeat_expiry_s;
    let env = Env::start_with(opts).await;
    let peers: Vec<_> = (1..controllers)
        .map(|i| env.start_peer_controller(&format!("p{i}"), &[]))
        .collect();
    let mut pids = vec![env.controller_pid().context("no controller")?];
    pids.extend(peers.iter().map(|p| p.pid()));
    let t = Instant::now();
    let seeded = coffer_tests::sim::seed(&env, n).await?;
    eprintln!(
        "  seeded {n} instances in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let interval = Duration::from_millis(a.interval_ms);
    let consumers = a.intents.unwrap_or(n).min(n);
    let fleet = coffer_tests::sim::start(&env, seeded, interval, consumers).await?;
    eprintln!(
        "  connected {n} agents in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Every intent consumer made (created a few at a time, with retries, as a fleet that
    // starts together gets them).
    let t = Instant::now();
    while fleet
        .stats
        .consuming
        .load(std::sync::atomic::Ordering::Relaxed)
        < consumers as u64
    {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("intent consumers not all made within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "  {consumers} intent consumers made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Warm up: every agent answered at least twice over.
    let warm = Instant::now();
    while fleet
        .stats
        .answered
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2 * n as u64
        && warm.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.stats.take_percentiles();
    // The measured window.
    let ticks0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let disk0: u64 = pids.iter().map(|p| disk_bytes(*p)).sum();
    let rows0 = if postgres {
        pg_rows_written(&env).await
    } else {
        0
    };
    let answered0 = fleet
        .stats
        .answered
        .load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&ticks0)
        .map(|(p, t)| (cpu_ticks(*p) - t) as f64 / hz / secs * 100.0)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|p| rss_mb(*p)).collect();
    let hb = fleet.stats.take_percentiles();
    let answered = (fleet
        .stats
        .answered
        .load(std::sync::atomic::Ordering::Relaxed)
        - answered0) as f64
        / secs;
    let writes = if postgres {
        format!(
            "{:.1} rows/s",
            (pg_rows_written(&env).await - rows0) as f64 / secs
        )
    } else {
        let disk: u64 = pids.iter().map(|p| disk_bytes(*p)).sum();
        format!("{:.1} KB/s to disk", (disk - disk0) as f64 / 1024.0 / secs)
    };
    // The list a user pages through, while the fleet heartbeats.
    let mut list = vec![];
    for _ in 0..100 {
        let t = Instant::now();
        let (st, v) = env.call("GET", "/instances?limit=100", None).await;
        if st != StatusCode::OK {
            bail!("listing failed: {st} {v}");
        }
        list.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let list = (percentile(&mut list, 0.5), percentile(&mut list, 0.99));
    // Restarts through the API, all at once, of agents that take intents (and are not killed
    // below): posted → ACTIVE again, as a user polling would see it.
    let restart = restarts(
        &env,
        &fleet.ids[a.kill.min(n)..consumers.max(a.kill.min(n))],
        a.restarts,
    )
    .await?;
    let delivery = {
        let (p50, p99, _) = fleet.stats.take_intent_percentiles();
        (p50, p99)
    };
    // Hosts lost at once: how long until each shows ERROR.
    let dead = fleet.kill(0..a.kill.min(n));
    let killed_at = Instant::now();
    let detect = seconds_until_each(
        &env,
        &dead,
        killed_at,
        Duration::from_secs(expiry * 4 + 30),
        "seen lost (ERROR)",
        "ERROR",
    )
    .await?;
    drop(fleet);
    drop(peers);
    // The next run needs as many connections again: wait for these to close.
    let closing = Instant::now();
    while open_fds() > 512 && closing.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Row {
        agents: n,
        setup: if postgres {
            format!("postgres x{controllers}")
        } else {
            "sqlite x1".into()
        },
        cpu,
        rss,
        hb,
        answered,
        writes,
        detect,
        list,
        delivery,
        restart,
    })
}

/// Restarts up to `n` of `ids` at once through the API; seconds until each is ACTIVE again
/// (p50, max).
async fn restarts(env: &Env, ids: &[String], n: usize) -> anyhow::Result<(f64, f64)> {
    let ids = &ids[..n.min(ids.len())];
    let t = Instant::now();
    for id in ids {
        let (st, v) = env.restart(id).await;
        if st != StatusCode::ACCEPTED {
            bail!("restart of {id} refused: {st} {v}");
        }
    }
    seconds_until_each(
        env,
        ids,
        t,
        Duration::from_secs(120),
        "ACTIVE after a restart",
        "ACTIVE",
    )
    .await
}

/// Polls the instances `ids` every 50 ms until each shows `status`; the seconds from `t` at
/// which they did (p50, max), or an error naming `what` when some did not within `limit`.
async fn seconds_until_each(
    env: &Env,
    ids: &[String],
    t: Instant,
    limit: Duration,
    what: &str,
    status: &str,
) -> anyhow::Result<(f64, f64)> {
    let mut waiting: Vec<&String> = ids.iter().collect();
    let mut seen = vec![];
    while !waiting.is_empty() {
        if t.elapsed() > limit {
            bail!("{} instances not {what} within {limit:?}", waiting.len());
        }
        let checks = waiting.iter().map(|id| async move {
            let (_, v) = env.call("GET", &format!("/instances/{id}"), None).await;
            (*id, v["instance"]["status"] == status)
        });
        let results = futures::future::join_all(checks).await;
        let at = t.elapsed().as_secs_f64();
        for (id, done) in results {
            if done {
                seen.push(at);
                waiting.retain(|w| *w != id);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((percentile(&mut seen, 0.5), percentile(&mut seen, 1.0)))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    // The kit finds the controller and agent binaries beside this one.
    if std::env::var_os("COFFER_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        std::env::set_var("COFFER_BIN_DIR", exe.parent().context("no bin dir")?);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            // Interrupted, the run's servers, controllers and fleet are still dropped (stopped).
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = run() => r,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                _ = term.recv() => bail!("terminated"),
            }
        })
}

async fn run() -> anyhow::Result<()> {
    let a = parse()?;
    // Ten thousand agents are ten thousand connections, here and in nats-server.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let expiry = Opts::default().heartbeat_expiry_s;
    println!(
        "coffer-sim bench: agents heartbeat every {} ms; expiry {expiry} s; {} s measured per run; load before: {}",
        a.interval_ms,
        a.seconds,
        loadavg()
    );
    println!(
        "\n{:>6}  {:<12} {:>16} {:>16} {:>18} {:>9} {:>22} {:>18} {:>16} {:>18} {:>20}",
        "agents",
        "store",
        "cpu % per ctl",
        "rss MB per ctl",
        "reply p50/p99 ms",
        "replies/s",
        "store writes",
        "lost seen p50/max s",
        "list p50/p99 ms",
        "intent p50/p99 ms",
        "restart p50/max s"
    );
    for (postgres, controllers) in &a.setups {
        for n in &a.agents {
            eprintln!(
                "run: {n} agents, {} x{controllers}",
                if *postgres { "postgres" } else { "sqlite" }
            );
            let r = run_one(&a, *postgres, *controllers, *n).await?;
            let join = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.1}"))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            println!(
                "{:>6}  {:<12} {:>16} {:>16} {:>18} {:>9.0} {:>22} {:>18} {:>16} {:>18} {:>20}",
                r.agents,
                r.setup,
                join(&r.cpu),
                join(&r.rss),
                format!("{:.1}/{:.1}", r.hb.0, r.hb.1),
                r.answered,
                r.writes,
                format!("{:.2}/{:.2}", r.detect.0, r.detect.1),
                format!("{:.1}/{:.1}", r.list.0, r.list.1),
                format!("{:.1}/{:.1}", r.delivery.0, r.delivery.1),
                format!("{:.2}/{:.2}", r.restart.0, r.restart.1),
            );
        }
    }
    println!(
        "\ntargets per controller: cpu < 50 % of a core at 10,000 agents, reply p99 < 50 ms, \
         lost seen within expiry + 1 s ({} s), list p99 < 100 ms",
        expiry + 1
    );
    Ok(())
}
