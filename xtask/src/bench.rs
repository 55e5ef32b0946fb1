//! `cargo xtask bench lifecycle [--runs N] [--idle-secs S]`: in one run, side by side,
//! - the floor: `mariadb-install-db` + `mariadbd` with the very my.cnf Coffer renders for the same
//!   flavor, until `SELECT 1` answers;
//! - Coffer: create → ACTIVE through the API, polled every 10 ms;
//! - their ratio (medians), and the agent's idle RSS and CPU over a window.
//!
//! Release binaries. Figures, not assertions.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::env;

pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Auth-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status: u16 = out.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let b = out.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok((status, serde_json::from_str(b).unwrap_or(Value::Null)))
}

/// Writes mariabackup's credentials for an instance (its admin, through its socket) into a
/// 0600 defaults file at `path`, as the agent does; returns the admin password.
pub(crate) fn mariabackup_creds(instance_root: &Path, path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let pw = std::fs::read_to_string(instance_root.join("admin.password"))?
        .trim()
        .to_string();
    let sock = std::fs::read_to_string(instance_root.join("my.cnf"))?
        .lines()
        .find_map(|l| l.strip_prefix("socket = ").map(String::from))
        .context("socket in my.cnf")?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(
        format!("[mariabackup]\nuser=coffer_admin\npassword={pw}\nsocket={sock}\n").as_bytes(),
    )?;
    Ok(pw)
}

pub(crate) fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Killer(pub Vec<Child>);
impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A floor server's my.cnf from the one Coffer rendered for an instance at `instance_root`:
/// paths moved to `dir`, Coffer's includes (groups, logs, role, modules) dropped, the
/// `key = value` lines of `set` replaced, and the server's `user` root (the floor runs as the
/// bench does; the instance's own Unix user is gone with it). Makes `dir/files`, the moved
/// `secure_file_priv` (the server refuses to start without it).
pub(crate) fn floor_cnf(
    rendered: &str,
    instance_root: &str,
    dir: &Path,
    set: &[(&str, String)],
) -> String {
    let _ = std::fs::create_dir_all(dir.join("files"));
    rendered
        .replace(instance_root, &dir.display().to_string())
        .lines()
        .filter(|l| !l.starts_with("!include"))
        .map(|l| {
            set.iter()
                .find(|(k, _)| l.starts_with(&format!("{k} = ")))
                .map(|(k, v)| format!("{k} = {v}"))
                .unwrap_or_else(|| match l.starts_with("user = ") {
                    true => "user = root".to_string(),
                    false => l.to_string(),
                })
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One floor run: returns seconds from install-db start until SELECT 1 answers.
fn floor_run(cnf_template: &str, instance_root: &str, dir: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let port = free_port();
    let cnf = floor_cnf(
        cnf_template,
        instance_root,
        dir,
        &[("port", port.to_string())],
    );
    let cnf_path = dir.join("my.cnf");
    std::fs::write(&cnf_path, cnf)?;
    let sock = dir.join("mysqld.sock");
    let t0 = Instant::now();
    let st = Command::new("mariadb-install-db")
        .arg(format!("--defaults-file={}", cnf_path.display()))
        .arg(format!("--datadir={}", dir.join("data").display()))
        .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
        .output()?;
    if !st.status.success() {
        let err = String::from_utf8_lossy(&st.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        bail!(
            "mariadb-install-db failed in the floor run (my.cnf: {}):\n{}",
            cnf_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let child = Command::new("/usr/sbin/mariadbd")
        .arg(format!("--defaults-file={}", cnf_path.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _k = Killer(vec![child]);
    wait_select1(&sock, t0, Duration::from_secs(60))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Polls `SELECT 1` as root over `sock` (every 10 ms) until it answers or `limit` has passed
/// since `t0`.
pub(crate) fn wait_select1(sock: &Path, t0: Instant, limit: Duration) -> anyhow::Result<()> {
    loop {
        let ok = Command::new("mariadb")
            .arg(format!("--socket={}", sock.display()))
            .args(["-u", "root", "-e", "SELECT 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("mariadbd at {} never answered", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Prepares tools, builds release binaries (or, in smoke mode, takes the debug ones the test
/// suite just built) and runs `f` with a fresh temp dir (removed after).
pub(crate) fn with_release(
    name: &str,
    smoke: bool,
    f: impl FnOnce(&env::Tools, &Path, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tools = env::prepare()?;
    let bins = if smoke {
        tools.target_dir.join("debug")
    } else {
        env::step("building release binaries");
        env::cargo(&["build", "--release", "--workspace", "--bins"])?;
        tools.target_dir.join("release")
    };
    let tmp = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = f(&tools, &bins, &tmp);
    if std::env::var_os("COFFER_BENCH_KEEP").is_some() {
        eprintln!("xtask: the bench's files are kept in {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What the figures came from: a release build, or the debug one of a smoke run (whose
/// figures measure nothing).
pub(crate) fn build_label(bins: &Path) -> &'static str {
    if bins.ends_with("debug") {
        "debug build, smoke run: not a measurement"
    } else {
        "release build"
    }
}

/// Every bench once in smoke mode (tiny data, one run, debug binaries, no targets): what
/// `cargo xtask test` runs after the suite, so a change that breaks a bench fails CI.
pub fn smoke_all() -> anyhow::Result<()> {
    let smoke = ["--smoke".to_string()];
    run(&["lifecycle".to_string(), smoke[0].clone()])
        .context("cargo xtask bench lifecycle --smoke")?;
    crate::bench_backup::run(&smoke).context("cargo xtask bench backup --smoke")?;
    crate::bench_replication::run(&smoke).context("cargo xtask bench replication --smoke")?;
    crate::bench_pitr::run(&smoke).context("cargo xtask bench pitr --smoke")?;
    Ok(())
}

pub(crate) fn proc_rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn proc_cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut it = args.iter();
    let what = it.next().map(String::as_str).unwrap_or("");
    if what != "lifecycle" {
        bail!("usage: cargo xtask bench lifecycle [--runs N] [--idle-secs S] [--smoke] | bench backup [--size-mb N] [--smoke] | bench replication [--size-mb N] [--smoke] | bench pitr [--size-mb N] [--seconds S] [--datastore mariadb|postgresql|all] [--smoke] | bench scale [--smoke]");
    }
    let mut runs = 5usize;
    let mut idle = 60u64;
    let mut smoke = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--idle-secs" => idle = it.next().context("--idle-secs S")?.parse()?,
            "--smoke" => (smoke, runs, idle) = (true, 1, 2),
            other => {
                bail!("unknown bench option '{other}' (known: --runs N, --idle-secs S, --smoke)")
            }
        }
    }
    with_release("coffer-bench", smoke, |tools, bins, tmp| {
        bench(tools, bins, tmp, runs, idle)
    })
}

/// `cargo xtask bench scale [options]`: the control plane with a simulated fleet (the test kit's
/// `coffer-sim bench`, on release binaries; its options pass through, e.g. `--agents 1000,5000`,
/// `--seconds 20`, `--only sqlite`, `--smoke`).
pub fn scale(args: &[String]) -> anyhow::Result<()> {
    let tools = env::prepare()?;
    env::step("building release binaries");
    env::cargo(&["build", "--release", "--workspace", "--bins"])?;
    let bins = tools.target_dir.join("release");
    env::step("running the fleet simulator");
    let mut c = Command::new(bins.join("coffer-sim"));
    tools.apply(&mut c);
    let status = c
        .env("COFFER_BIN_DIR", &bins)
        .arg("bench")
        .args(args)
        .status()
        .context("running coffer-sim")?;
    if !status.success() {
        bail!("the scale bench failed ({status})");
    }
    Ok(())
}

/// A Coffer (nats-server + controller with release binaries) in a temp dir, for benchmarks.
pub(crate) struct Bench {
    /// nats-server, then the controller.
    pub procs: Killer,
    pub api_port: u16,
    pub token: &'static str,
    /// The bench's directory: what still runs from it at the end is stopped.
    dir: std::path::PathBuf,
}

impl Drop for Bench {
    /// Stops the controller with SIGTERM, so (with `stop_agents_on_exit`) its agents stop their
    /// databases and exit; then nats-server; then whatever still runs from the bench's
    /// directory (an agent or database the controller could not reach), so no bench leaves a
    /// server behind, whether it finished or failed.
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Some(ctl) = self.procs.0.get_mut(1) {
            let _ = kill(Pid::from_raw(ctl.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(ctl.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for c in &mut self.procs.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.procs.0.clear();
        let dir = format!("{}/", self.dir.display());
        let left = || -> Vec<i32> {
            let Ok(rd) = std::fs::read_dir("/proc") else {
                return vec![];
            };
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir))
                })
                .collect()
        };
        for pid in left() {
            eprintln!("xtask: stopping process {pid} the bench left running");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Bench {
    pub fn start(
        tools: &env::Tools,
        bins: &Path,
        tmp: &Path,
        extra_config: &str,
    ) -> anyhow::Result<Bench> {
        Self::start_with(tools, bins, tmp, extra_config, "")
    }

    /// [`Bench::start`] with extra `[provisioner]` lines.
    pub fn start_with(
        tools: &env::Tools,
        bins: &Path,
        tmp: &Path,
        extra_config: &str,
        provisioner_extra: &str,
    ) -> anyhow::Result<Bench> {
        let nats_port = free_port();
        let api_port = free_port();
        let mut procs = Killer(vec![]);
        // As the demo: each instance runs as a Unix user of its own.
        let agent_bin = crate::demo::place_agent(bins, tmp)?;
        let token = "bench-token-0123456789";
        std::fs::write(
            tmp.join("tokens.toml"),
            format!("[[token]]\ntoken = \"{token}\"\nproject = \"bench\"\nadmin = true\n"),
        )?;
        let cfg = tmp.join("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{api_port}\"\ndata_dir = {:?}\nnats_url = \"nats://127.0.0.1:{nats_port}\"\ntoken_file = {:?}\n\
                 stop_agents_on_exit = true\ndefault_datastore = \"mariadb\"\nnats_creds = {:?}\n{extra_config}\n\
                 [nats_auth]\ndir = {:?}\n\n[provisioner]\nkind = \"process\"\nagent_binary = {:?}\ninstances_dir = {:?}\n\
                 port_min = 14306\nport_max = 14405\n{provisioner_extra}",
                tmp.join("controller").display().to_string(),
                tmp.join("tokens.toml").display().to_string(),
                tmp.join("nats-auth/controller.creds").display().to_string(),
                tmp.join("nats-auth").display().to_string(),
                agent_bin.display().to_string(),
                tmp.join("instances").display().to_string(),
            ),
        )?;
        // Authorization on, as in production.
        crate::demo::nats_setup(&bins.join("coffer-controller"), &cfg)?;
        procs.0.push(
            Command::new(&tools.nats_server)
                .arg("-c")
                .arg(tmp.join("nats-auth/server-auth.conf"))
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &nats_port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(tmp.join("nats"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        crate::demo::register(&bins.join("coffer-controller"), &cfg)?;
        procs.0.push(
            Command::new(bins.join("coffer-controller"))
                .arg("--config")
                .arg(&cfg)
                .arg("serve")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(tmp.join("controller.log"))?)
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", api_port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "controller did not start; see {}",
                    tmp.join("controller.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Bench {
            procs,
            api_port,
            token,
            dir: tmp.to_path_buf(),
        })
    }

    /// Creates an instance and waits for ACTIVE; returns its id and the seconds it took.
    pub fn create(&self, body: Value) -> anyhow::Result<(String, f64)> {
        let t0 = Instant::now();
        let (st, v) = http(
            self.api_port,
            "POST",
            "/v1.0/bench/instances",
            self.token,
            Some(&body),
        )?;
        if st != 200 {
            bail!("create failed: {st} {v}");
        }
        let id = v["instance"]["id"].as_str().unwrap_or_default().to_string();
        loop {
            let (_, v) = http(
                self.api_port,
                "GET",
                &format!("/v1.0/bench/instances/{id}"),
                self.token,
                None,
            )?;
            match v["instance"]["status"].as_str() {
                Some("ACTIVE") => return Ok((id, t0.elapsed().as_secs_f64())),
                Some("ERROR") => bail!("instance went to ERROR: {v}"),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(1800) {
                bail!("instance not ACTIVE after 30 min");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Deletes an instance and waits until it is gone (its server stopped, its files removed).
    pub fn delete(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/v1.0/bench/instances/{id}");
        let (st, v) = http(self.api_port, "DELETE", &path, self.token, None)?;
        if st != 202 {
            bail!("delete of {id} failed: {st} {v}");
        }
        let t0 = Instant::now();
        while http(self.api_port, "GET", &path, self.token, None)?.0 != 404 {
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("instance {id} not gone 5 min after its delete");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops everything now (as dropping it does): the controller first, so it shuts agents
    /// and databases down cleanly.
    pub fn stop(self) {
        drop(self)
    }
}

fn bench(
    tools: &env::Tools,
    bins: &Path,
    tmp: &Path,
    runs: usize,
    idle: u64,
) -> anyhow::Result<()> {
    let coffer_env = Bench::start(tools, bins, tmp, "")?;
    let api_port = coffer_env.api_port;
    let token = coffer_env.token;
    env::step(&format!("create -> ACTIVE through the API, {runs} runs"));
    let mut coffer = vec![];
    let mut last_id = String::new();
    for i in 0..runs {
        let body = json!({"instance": {"name": format!("bench{i}"), "flavorRef": "1", "volume": {"size": 1}}});
        let t0 = Instant::now();
        let (st, v) = http(
            api_port,
            "POST",
            "/v1.0/bench/instances",
            token,
            Some(&body),
        )?;
        if st != 200 {
            bail!("create failed: {st} {v}");
        }
        let id = v["instance"]["id"].as_str().unwrap_or_default().to_string();
        loop {
            let (_, v) = http(
                api_port,
                "GET",
                &format!("/v1.0/bench/instances/{id}"),
                token,
                None,
            )?;
            match v["instance"]["status"].as_str() {
                Some("ACTIVE") => break,
                Some("ERROR") => bail!("instance went to ERROR: {v}"),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("instance not ACTIVE after 120 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        coffer.push(t0.elapsed().as_secs_f64());
        eprintln!("  coffer run {}: {:.3} s", i + 1, coffer[i]);
        last_id = id;
    }

    // The floor uses the very my.cnf Coffer rendered for the same flavor.
    let root = tmp.join("instances").join(&last_id).join("state/mariadb");
    let cnf =
        std::fs::read_to_string(root.join("my.cnf")).context("reading the rendered my.cnf")?;
    env::step(&format!(
        "floor: mariadb-install-db + mariadbd until SELECT 1, {runs} runs"
    ));
    let mut floor = vec![];
    for i in 0..runs {
        let d = tmp.join(format!("floor{i}"));
        floor.push(floor_run(&cnf, &root.display().to_string(), &d)?);
        eprintln!("  floor run {}: {:.3} s", i + 1, floor[i]);
        let _ = std::fs::remove_dir_all(&d);
    }

    let agent_pid: i32 =
        std::fs::read_to_string(tmp.join("instances").join(&last_id).join("state/agent.pid"))?
            .trim()
            .parse()?;
    env::step(&format!("agent idle RSS and CPU over {idle} s"));
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let c0 = proc_cpu_ticks(agent_pid);
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(idle) {
        rss_max = rss_max.max(proc_rss_kb(agent_pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu = (proc_cpu_ticks(agent_pid) - c0) as f64 / ticks / t0.elapsed().as_secs_f64() * 100.0;

    let (fm, fmin, fmax) = stats(&mut floor);
    let (cm, cmin, cmax) = stats(&mut coffer);
    let build = crate::bench::build_label(bins);
    println!("\nbench lifecycle ({runs} runs, flavor coffer.tiny, MariaDB, {build})");
    println!("  floor  install-db + mariadbd -> SELECT 1 : median {fm:.3} s  (min {fmin:.3}, max {fmax:.3})");
    println!("  coffer create -> ACTIVE (10 ms polls)    : median {cm:.3} s  (min {cmin:.3}, max {cmax:.3})");
    println!(
        "  ratio coffer / floor                     : {:.2}  (target <= 1.3)",
        cm / fm
    );
    println!(
        "  agent idle RSS                           : {:.1} MB (max over {idle} s; target < 20 MB)",
        rss_max as f64 / 1024.0
    );
    println!("  agent idle CPU                           : {cpu:.2} % of one core");
    coffer_env.stop();
    Ok(())
}
