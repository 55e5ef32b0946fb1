//! Database process lifecycle: spawn (in its own session, output to a file), adopt a server left
//! running by a previous agent (pid file checked against `/proc`, watched through a pidfd), probe,
//! stop cleanly, and restart after a crash with backoff.
//!
//! The supervisor is the only writer of the observed service status; everything else reads it from
//! the `watch` channel and sends commands.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_proto::v1::ServiceStatus;
use coffer_strategies::{Datastore, Health};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::{write_atomic, StateDir};

/// What the supervisor sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub status: ServiceStatus,
    pub pid: u32,
    pub fault: String,
    pub connections: u32,
}

/// Orders for the supervisor.
#[derive(Debug)]
pub enum Cmd {
    /// Start the server (no-op if running) and wait until it answers.
    Start,
    /// Stop the server cleanly.
    Stop,
    /// Stop, then start.
    Restart,
    /// Stop cleanly because the agent is going away; the database is started again by the next
    /// agent (the status goes to shutdown like [`Cmd::Stop`]).
    StopKeepDesired,
    /// Report a status decided elsewhere (building, failed, deleted).
    Report(ServiceStatus, String),
}

/// Handle to a running supervisor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<(Cmd, oneshot::Sender<Result<(), String>>)>,
    pub observed: watch::Receiver<Observed>,
}

impl Handle {
    /// Sends a command and waits for its outcome.
    pub async fn call(&self, cmd: Cmd) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((cmd, tx))
            .await
            .map_err(|_| "supervisor stopped".to_string())?;
        rx.await.map_err(|_| "supervisor stopped".to_string())?
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DbRecord {
    pid: i32,
    starttime: u64,
}

enum Proc {
    Child(tokio::process::Child),
    Adopted { pid: i32, fd: AsyncFd<OwnedFd> },
}

impl Proc {
    fn pid(&self) -> i32 {
        match self {
            Proc::Child(c) => c.id().map(|p| p as i32).unwrap_or(0),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end and describes how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(st) => describe_exit(st),
                Err(e) => format!("wait failed: {e}"),
            },
            Proc::Adopted { fd, .. } => {
                let _ = fd.readable().await;
                "exited".to_string()
            }
        }
    }

    /// Whether it has already ended.
    fn exited_now(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(st)) => Some(describe_exit(st)),
                Ok(None) => None,
                Err(e) => Some(format!("wait failed: {e}")),
            },
            Proc::Adopted { pid, .. } => {
                if kill(Pid::from_raw(*pid), None).is_err() {
                    Some("exited".into())
                } else {
                    None
                }
            }
        }
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (_, Some(s)) => format!(
            "killed by signal {}",
            Signal::try_from(s)
                .map(|s| s.as_str().to_string())
                .unwrap_or(s.to_string())
        ),
        _ => "exited".into(),
    }
}

async fn wait_opt(p: &mut Option<Proc>) -> String {
    match p {
        Some(p) => p.wait().await,
        None => std::future::pending().await,
    }
}

/// Starts the supervisor task. It adopts or starts the server according to the desired state.
pub fn spawn(
    ds: Arc<dyn Datastore>,
    state: Arc<StateDir>,
    stop_timeout: Duration,
    shutdown: CancellationToken,
) -> (Handle, tokio::task::JoinHandle<()>) {
    // A prepared instance's server may well be running: until the supervisor has looked
    // (adopted it, or started it), its status is unknown, and heartbeats say so rather than
    // report a shutdown that is not one (the controller keeps the status it had).
    let initial = if state.desired().prepared {
        ServiceStatus::Unknown
    } else {
        ServiceStatus::New
    };
    let (obs_tx, obs_rx) = watch::channel(Observed {
        status: initial,
        pid: 0,
        fault: String::new(),
        connections: 0,
    });
    let (tx, rx) = mpsc::channel(8);
    let sup = Supervisor {
        ds,
        state,
        stop_timeout,
        obs: obs_tx,
        proc: None,
        crash_delays: crash_backoff(),
        restart_at: None,
        running_since: None,
        probe_failures: 0,
    };
    let task = tokio::spawn(sup.run(rx, shutdown));
    (
        Handle {
            tx,
            observed: obs_rx,
        },
        task,
    )
}

struct Supervisor {
    ds: Arc<dyn Datastore>,
    state: Arc<StateDir>,
    stop_timeout: Duration,
    obs: watch::Sender<Observed>,
    proc: Option<Proc>,
    /// Delays before restarting a crashed server (reset once it has run a minute).
    crash_delays: Box<dyn Iterator<Item = Duration> + Send>,
    restart_at: Option<tokio::time::Instant>,
    running_since: Option<Instant>,
    probe_failures: u32,
}

const START_TIMEOUT: Duration = Duration::from_secs(300);
const PROBE_EVERY: Duration = Duration::from_secs(5);

fn crash_backoff() -> Box<dyn Iterator<Item = Duration> + Send> {
    Box::new(coffer_common::retry::backoff(
        Duration::from_millis(500),
        Duration::from_secs(60),
    ))
}

impl Supervisor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(Cmd, oneshot::Sender<Result<(), String>>)>,
        shutdown: CancellationToken,
    ) {
        let desired = self.state.desired();
        if desired.prepared && !desired.deleted {
            if let Some(p) = self.try_adopt() {
                info!(pid = p.pid(), "adopted running database server");
                self.proc = Some(p);
                if let Err(e) = self.wait_ready().await {
                    warn!(error = %e, "adopted server did not answer");
                    // It died while being adopted (killed, crashed): started again like any
                    // crash, not left down.
                    if self.proc.is_none() && desired.running {
                        self.crashed(format!(
                            "the database server stopped while this agent adopted it: {e}"
                        ));
                    }
                }
            } else if desired.running {
                if let Err(e) = self.start().await {
                    self.crashed(format!("start failed: {e}"));
                }
            }
        }
        // Looked: a server neither adopted nor started is down.
        if self.obs.borrow().status == ServiceStatus::Unknown {
            self.set(ServiceStatus::Shutdown, String::new());
        }
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let restart_at = self.restart_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => {
                    let Some((cmd, reply)) = cmd else { break };
                    let r = self.handle(cmd).await;
                    let _ = reply.send(r);
                }
                how = wait_opt(&mut self.proc) => {
                    self.proc = None;
                    let name = self.ds.name();
                    self.crashed(format!("{name} server {how}"));
                }
                _ = async { tokio::time::sleep_until(restart_at.unwrap()).await }, if restart_at.is_some() => {
                    self.restart_at = None;
                    if self.state.desired().running && self.proc.is_none() {
                        info!("restarting crashed database server");
                        if let Err(e) = self.start().await {
                            self.crashed(format!("restart failed: {e}"));
                        }
                    }
                }
                _ = probe.tick(), if self.proc.is_some() => self.probe_once().await,
            }
        }
        // Leaving the server running is deliberate: a new agent adopts it.
    }

    fn set(&self, status: ServiceStatus, fault: String) {
        let pid = self.proc.as_ref().map(|p| p.pid() as u32).unwrap_or(0);
        self.obs.send_if_modified(|o| {
            let new = Observed {
                status,
                pid,
                fault: fault.clone(),
                connections: o.connections,
            };
            if *o != new {
                *o = new;
                true
            } else {
                false
            }
        });
    }

    fn crashed(&mut self, why: String) {
        warn!(reason = %why, "database server is down");
        let _ = std::fs::remove_file(self.state.root().join("db.json"));
        let ds = self.ds.clone();
        tokio::spawn(async move { ds.disconnect().await });
        if self
            .running_since
            .map(|t| t.elapsed() > Duration::from_secs(60))
            .unwrap_or(false)
        {
            self.crash_delays = crash_backoff();
        }
        self.running_since = None;
        let delay = coffer_common::retry::next(&mut self.crash_delays);
        self.set(ServiceStatus::Crashed, why);
        if self.state.desired().running {
            self.restart_at = Some(tokio::time::Instant::now() + delay);
        }
    }

    async fn handle(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Start => {
                self.restart_at = None;
                self.start().await
            }
            Cmd::Stop | Cmd::StopKeepDesired => {
                self.restart_at = None;
                self.stop().await
            }
            Cmd::Restart => {
                self.restart_at = None;
                self.set(ServiceStatus::Restarting, String::new());
                self.stop_process().await?;
                self.start().await
            }
            Cmd::Report(status, fault) => {
                self.set(status, fault);
                Ok(())
            }
        }
    }

    async fn start(&mut self) -> Result<(), String> {
        if self.proc.is_some() {
            return self.wait_ready().await;
        }
        let cmd = self.ds.server_command();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cmd.output_file)
            .map_err(|e| format!("opening {}: {e}", cmd.output_file.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut c = tokio::process::Command::new(&cmd.program);
        c.args(&cmd.args)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(false);
        if let Some((uid, gid)) = cmd.run_as {
            c.uid(uid).gid(gid);
        }
        new_session(&mut c);
        let child = c
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", cmd.program.display()))?;
        let pid = child.id().unwrap_or(0) as i32;
        let rec = DbRecord {
            pid,
            starttime: proc_starttime(pid).unwrap_or(0),
        };
        write_atomic(
            &self.state.root().join("db.json"),
            &serde_json::to_vec(&rec).unwrap_or_default(),
        )
        .map_err(|e| e.to_string())?;
        info!(pid, "database server spawned");
        // This process reads the overrides as they are now: no restart is pending any more.
        let _ = std::fs::remove_file(self.state.root().join("restart-pending"));
        self.proc = Some(Proc::Child(child));
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        let mut delay = Duration::from_millis(10);
        loop {
            let Some(p) = self.proc.as_mut() else {
                return Err("server is not running".into());
            };
            if let Some(how) = p.exited_now() {
                self.proc = None;
                let log = self.ds.server_command().output_file;
                return Err(format!(
                    "server {how} while starting ({last}); see {}",
                    log.display()
                ));
            }
            match self.ds.probe().await {
                Health::Ready { connections } => {
                    if let Err(e) = self.ds.finish_first_start().await {
                        warn!(error = %e, "could not remove first-start files");
                    }
                    self.running_since = Some(Instant::now());
                    self.probe_failures = 0;
                    self.obs.send_modify(|o| o.connections = connections);
                    self.set(ServiceStatus::Running, String::new());
                    return Ok(());
                }
                Health::Down(why) => last = why,
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "server did not answer within {START_TIMEOUT:?}: {last}"
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    async fn stop_process(&mut self) -> Result<(), String> {
        let Some(mut p) = self.proc.take() else {
            return Ok(());
        };
        self.ds.disconnect().await;
        let pid = p.pid();
        let sig = self.ds.server_command().stop_signal;
        info!(pid, signal = %sig, "stopping database server");
        let _ = kill(Pid::from_raw(pid), sig);
        if tokio::time::timeout(self.stop_timeout, p.wait())
            .await
            .is_err()
        {
            warn!(pid, signal = %sig, "database server ignored its stop signal; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            p.wait().await;
        }
        let _ = std::fs::remove_file(self.state.root().join("db.json"));
        self.running_since = None;
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), String> {
        self.stop_process().await?;
        self.set(ServiceStatus::Shutdown, String::new());
        Ok(())
    }

    async fn probe_once(&mut self) {
        match self.ds.probe().await {
            Health::Ready { connections } => {
                self.probe_failures = 0;
                self.obs.send_if_modified(|o| {
                    let changed = o.connections != connections;
                    o.connections = connections;
                    changed
                });
                let cur = self.obs.borrow().status;
                if cur == ServiceStatus::Blocked || cur == ServiceStatus::Crashed {
                    self.set(ServiceStatus::Running, String::new());
                }
            }
            Health::Down(why) => {
                self.probe_failures += 1;
                if self.probe_failures >= 3 {
                    self.set(
                        ServiceStatus::Blocked,
                        format!("server runs but does not answer: {why}"),
                    );
                }
            }
        }
    }

    /// Adopts a server a previous agent left running, if the pid file and `/proc` agree it is ours.
    fn try_adopt(&self) -> Option<Proc> {
        let cmd = self.ds.server_command();
        let rec: DbRecord =
            serde_json::from_slice(&std::fs::read(self.state.root().join("db.json")).ok()?).ok()?;
        let from_pidfile: Option<i32> = std::fs::read_to_string(&cmd.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(p) = from_pidfile {
            if p != rec.pid {
                warn!(
                    pid_file = p,
                    recorded = rec.pid,
                    "pid file disagrees with record; not adopting"
                );
                return None;
            }
        }
        let pid = rec.pid;
        if proc_starttime(pid)? != rec.starttime {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&cmd.cmdline_marker) {
            return None;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let want = cmd.program.file_name()?.to_string_lossy().to_string();
        // The program may be a link to another binary (a packaged server linked to its
        // checker tool).
        let want_real = std::fs::canonicalize(&cmd.program)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| want.clone());
        let have = exe.file_name()?.to_string_lossy().to_string();
        if !have.starts_with(&want) && !have.starts_with(&want_real) {
            return None;
        }
        let fd = pidfd(pid)?;
        Some(Proc::Adopted { pid, fd })
    }
}

fn pidfd(pid: i32) -> Option<AsyncFd<OwnedFd>> {
    let p = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    // The AsyncFd owns the pidfd (OwnedFd), so it cannot be closed while registered.
    #[allow(deprecated)]
    let fd = AsyncFd::new(fd).ok();
    fd
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn proc_starttime(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[allow(unsafe_code)]
fn new_session(c: &mut tokio::process::Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it runs in the
    // forked child before exec, so a signal to the agent's process group never reaches the server.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
}

/// Stops a server found through the state dir's record without a running agent (used by
/// `coffer-agent teardown` when an instance is deleted while its agent is gone).
pub fn kill_recorded(state_root: &std::path::Path, timeout: Duration) -> Option<i32> {
    let rec: DbRecord =
        serde_json::from_slice(&std::fs::read(state_root.join("db.json")).ok()?).ok()?;
    if proc_starttime(rec.pid)? != rec.starttime {
        return None;
    }
    let pid = Pid::from_raw(rec.pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if kill(pid, None).is_ok() {
        let _ = kill(pid, Signal::SIGKILL);
    }
    Some(rec.pid)
}

/// Seconds since the process started, from `/proc`.
pub fn uptime_secs(pid: u32) -> u64 {
    let Some(start) = proc_starttime(pid as i32) else {
        return 0;
    };
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (up as u64).saturating_sub(start / ticks.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttime_of_self_is_read() {
        let me = std::process::id() as i32;
        assert!(proc_starttime(me).unwrap() > 0);
        assert!(proc_starttime(i32::MAX).is_none());
    }
}
