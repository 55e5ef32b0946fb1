//! Test kit: starts real nats-server, coffer-controller (which places real agents running real
//! mariadbd) on ports from one cross-process allocator, in a temp dir, and cleans everything up.
//!
//! Binaries come from `COFFER_BIN_DIR` (set by `cargo xtask test`) or sit beside the test binary;
//! nats-server from `COFFER_NATS_SERVER`. Missing ones fail loudly, naming the fix.

pub mod debroot;
pub mod pgstore;
pub mod proxy;
pub mod scenario;
pub mod sim;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

pub use reqwest::StatusCode;

const PORT_MIN: u16 = 20000;
const PORT_MAX: u16 = 32000;

/// Hands out `n` free ports in ascending order; a lock file makes it safe across test processes.
pub fn alloc_ports(n: usize) -> Vec<u16> {
    let tmp = std::env::temp_dir();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tmp.join("coffer-test-ports.lock"))
        .expect("opening the port allocator lock");
    let _held = Flock::lock(lock, FlockArg::LockExclusive).expect("locking the port allocator");
    let next_file = tmp.join("coffer-test-ports.next");
    let mut next: u16 = std::fs::read_to_string(&next_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|p| (PORT_MIN..PORT_MAX).contains(p))
        .unwrap_or(PORT_MIN + (std::process::id() % 1000) as u16);
    let mut out = vec![];
    let mut tried = 0;
    while out.len() < n {
        tried += 1;
        assert!(
            tried < 20000,
            "no free ports left in {PORT_MIN}..{PORT_MAX}"
        );
        let p = next;
        next = if next + 1 >= PORT_MAX {
            PORT_MIN
        } else {
            next + 1
        };
        if p < out.last().copied().unwrap_or(0) {
            // Wrapped around: start again, so the ports handed out always ascend (a test
            // takes a range of them for its instances).
            out.clear();
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            out.push(p);
        }
    }
    std::fs::write(&next_file, next.to_string()).expect("writing the port allocator state");
    out
}

/// Where the workspace binaries are.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("COFFER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// A tiny qcow2 for the fake VMs (the provisioner reads its size and overlays it).
fn fake_image(dir: &Path) -> PathBuf {
    let p = dir.join("fake-guest.qcow2");
    if !p.exists() {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("64M")
            .status()
            .expect("qemu-img (qemu-utils) is installed by `cargo xtask test`");
        assert!(st.success(), "qemu-img create failed");
    }
    p
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the suite with `cargo xtask test` (it builds the binaries first)",
        p.display()
    );
    p
}

/// The nats-server binary (≥ 2.10, asserted).
pub fn nats_server_bin() -> PathBuf {
    let p = std::env::var("COFFER_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/coffer/venv/bin/nats-server")
        });
    let out = Command::new(&p).arg("--version").output().unwrap_or_else(|e| {
        panic!("nats-server not runnable at {} ({e}); run the suite with `cargo xtask test`, which installs it", p.display())
    });
    let v = String::from_utf8_lossy(&out.stdout).to_string();
    let nums: Vec<u32> = v
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or("")
        .split('.')
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(
        nums.len() >= 2 && (nums[0], nums[1]) >= (2, 10),
        "nats-server at {} is '{}'; Coffer needs >= 2.10 (cargo xtask test installs one)",
        p.display(),
        v.trim()
    );
    p
}

/// `coffer-controller serve` with `config`, its output appended to `log`.
fn spawn_controller(config: &Path, log: &Path, vars: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin("coffer-controller"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting coffer-controller")
}

/// Another controller of an [`Env`] (see [`Env::start_peer_controller`]); killed when dropped.
pub struct PeerController {
    pub port: u16,
    /// `http://127.0.0.1:PORT/v1.0/PROJECT`.
    pub base: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl PeerController {
    /// Its process id (0 once killed).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Kills it at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PeerController {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server with JetStream in a temp dir; can be stopped and started again on the same port
/// and store.
pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Nats {
    /// Starts nats-server; `config` is a server config file (e.g. the auth config).
    pub fn start(dir: &Path, port: u16, config: Option<PathBuf>) -> Nats {
        let mut n = Nats {
            port,
            dir: dir.to_path_buf(),
            config,
            child: None,
        };
        n.resume();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server without waiting for its port (a cluster's nodes start together).
    fn start_no_wait(dir: &Path, port: u16, config: Option<PathBuf>) -> Nats {
        let mut n = Nats {
            port,
            dir: dir.to_path_buf(),
            config,
            child: None,
        };
        n.spawn();
        n
    }

    /// Kills the server (SIGKILL): a node lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again).
    pub fn resume(&mut self) {
        self.spawn();
        wait_tcp(self.port, Duration::from_secs(20));
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let mut cmd = Command::new(nats_server_bin());
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        let child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("js"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
    }

    /// Stops the server cleanly.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The configuration of node `i` (0-based) of a three-node cluster whose route ports are
/// `routes`: its name, its routes to the others, `extra` (TLS), and the NATS authority's server
/// configuration with a resolver directory of its own (a `full` resolver's directory belongs to
/// one server).
fn nats_node_config(d: &Path, dir: &Path, i: usize, routes: &[u16; 3], extra: &str) -> PathBuf {
    let auth = std::fs::read_to_string(d.join("nats-auth/server-auth.conf")).unwrap();
    let jwt = d.join("nats-auth/jwt").display().to_string();
    let own = dir.join("jwt").display().to_string();
    assert!(
        auth.contains(&format!("{jwt:?}")),
        "no resolver dir in {auth}"
    );
    let auth_file = dir.join("server-auth.conf");
    write_private(
        &auth_file,
        auth.replace(&format!("{jwt:?}"), &format!("{own:?}")),
    )
    .unwrap();
    let others = routes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let conf = dir.join("nats-node.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: n{n}\ncluster {{\n  name: coffer\n  listen: \"127.0.0.1:{route}\"\n  routes: [{others}]\n}}\n{extra}include \"server-auth.conf\"\n",
            n = i + 1,
            route = routes[i],
        ),
    )
    .unwrap();
    conf
}

pub fn wait_tcp(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} after {timeout:?}");
}

/// Options for [`Env::start_with`].
#[derive(Clone)]
pub struct Opts {
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
    pub heartbeat_expiry_s: u64,
    pub build_timeout_s: u64,
    /// Extra TOML for every agent's `[datastore]` table (e.g. a broken install-db binary).
    pub datastore_extra: String,
    /// TLS for NATS and the HTTP API (a test CA made with the openssl CLI).
    pub tls: bool,
    /// Where backups go.
    pub backup_storage: BackupStorage,
    /// The backup strategy's configuration name.
    pub backup_strategy: &'static str,
    /// More `[backup]` lines (e.g. the archive's settings).
    pub backup_extra: &'static str,
    /// `[replication] strategy`.
    pub replication_strategy: &'static str,
    /// `[replication] auto_failover`.
    pub auto_failover: bool,
    /// Start dead agents again (off: a killed host stays dead).
    pub respawn_agents: bool,
    /// Agents reach NATS through a [`proxy::NatsProxy`] that can cut one of them off.
    pub nats_proxy: bool,
    /// Instances are VMs booted from this guest image (the `qemu` provisioner) instead of
    /// local processes; guests reach the controller and NATS as 10.0.2.2.
    pub qemu_image: Option<PathBuf>,
    /// Instances are "VMs" of the qemu provisioner run by `coffer-fake-qemu` (the agent and its
    /// database as local processes, enrolled from the seed the provisioner wrote): the VM path
    /// without virtualization.
    pub fake_vm: bool,
    /// The controller's store is a PostgreSQL database (a [`pgstore::PgStore`] of the test's
    /// own) instead of SQLite; `COFFER_TEST_STORE=postgres` makes it the default, so the whole
    /// suite can run on it.
    pub store_postgres: bool,
    /// NATS is a three-node JetStream cluster (streams with three replicas) instead of one
    /// server; `COFFER_TEST_NATS=cluster` makes it the default.
    pub nats_cluster: bool,
}

/// The backup storage backends, as a test selects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupStorage {
    /// A directory under the test's temp dir (`backups/`).
    Local,
    /// The NATS object store bucket `coffer-backups`, limited to `max_bytes` when given.
    Nats { max_bytes: Option<i64> },
}

/// The object store bucket the tests use.
pub const BACKUP_BUCKET: &str = "coffer-backups";

impl Default for Opts {
    fn default() -> Self {
        Opts {
            heartbeat_interval_ms: 500,
            // Three heartbeats per lease; 1500 + 50 + 2000 + 500 <= 5000 (the fence's margin).
            lease_ms: 1500,
            heartbeat_expiry_s: 5,
            build_timeout_s: 300,
            datastore_extra: String::new(),
            tls: false,
            backup_storage: BackupStorage::Local,
            backup_strategy: "mariabackup",
            backup_extra: "",
            replication_strategy: "mariadb-gtid",
            auto_failover: false,
            respawn_agents: true,
            nats_proxy: false,
            qemu_image: None,
            fake_vm: false,
            store_postgres: std::env::var("COFFER_TEST_STORE").is_ok_and(|v| v == "postgres"),
            nats_cluster: std::env::var("COFFER_TEST_NATS").is_ok_and(|v| v == "cluster"),
        }
    }
}

/// One Coffer: nats-server + controller (+ the agents and databases it places).
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The NATS server (the cluster's first node, with [`Opts::nats_cluster`]).
    pub nats: Nats,
    /// The cluster's other two nodes, with [`Opts::nats_cluster`].
    pub nats_peers: Vec<Nats>,
    pub api_port: u16,
    pub project: String,
    pub token: String,
    pub admin_token: String,
    pub other_token: String,
    /// A third project's token (`thirdproject`).
    pub third_token: String,
    pub http: reqwest::Client,
    controller: Option<Child>,
    config: PathBuf,
    pub backup_storage: BackupStorage,
    /// The agents' way to NATS, when [`Opts::nats_proxy`] is on.
    pub proxy: Option<proxy::NatsProxy>,
    /// The controller's PostgreSQL store, when [`Opts::store_postgres`] is on (stopped after the
    /// controller).
    pub pg: Option<pgstore::PgStore>,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(o: Opts) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("coffer-test-")
            .tempdir()
            .unwrap();
        let ports = alloc_ports(3 + 8 + 5);
        let proxy_port = ports[10];
        let nats_port = ports[0];
        // A cluster's nodes: client ports (the first is `nats_port`), then route ports.
        let node_ports = [nats_port, ports[11], ports[12]];
        let route_ports = [ports[13], ports[14], ports[15]];
        let nats_url = if o.nats_cluster {
            node_ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            format!("nats://127.0.0.1:{nats_port}")
        };
        let api_port = ports[1];
        let (inst_min, inst_max) = (ports[2], ports[9]);
        let project = "a1b2c3d4e5f6".to_string();
        let token = "tok-user-0123456789abcdef".to_string();
        let admin_token = "tok-admin-0123456789abcdef".to_string();
        let other_token = "tok-other-0123456789abcdef".to_string();
        let third_token = "tok-third-0123456789abcdef".to_string();
        let d = dir.path();
        // Instances run as users of their own (the kit runs as root): they must reach their
        // directories and the agent binary (a link beside them, outside root's home), and
        // nothing else here (the kit's own files are 0600).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
            std::fs::create_dir_all(d.join("bin")).unwrap();
            if std::fs::hard_link(bin("coffer-agent"), d.join("bin/coffer-agent")).is_err() {
                std::fs::copy(bin("coffer-agent"), d.join("bin/coffer-agent")).unwrap();
            }
        }
        write_private(
            &d.join("tokens.toml"),
            format!(
                "[[token]]\ntoken = \"{token}\"\nproject = \"{project}\"\n\n[[token]]\ntoken = \"{admin_token}\"\nproject = \"{project}\"\nadmin = true\n\n\
                 [[token]]\ntoken = \"{other_token}\"\nproject = \"otherproject\"\n\n\
                 [[token]]\ntoken = \"{third_token}\"\nproject = \"thirdproject\"\n"
            ),
        )
        .unwrap();
        // The allocator hands out ascending ports, but they may not be contiguous: only ports it
        // handed to us are in range when contiguous; otherwise the provisioner bind-checks each.
        let tls_lines = if o.tls {
            make_test_ca(&d.join("tls"));
            (
                format!(
                    "nats_ca_file = {:?}\n",
                    d.join("tls/ca.pem").display().to_string()
                ),
                format!(
                    "[tls]\ncert_file = {:?}\nkey_file = {:?}\n\n",
                    d.join("tls/server.pem").display().to_string(),
                    d.join("tls/server.key").display().to_string(),
                ),
            )
        } else {
            (String::new(), String::new())
        };
        write_keyring(&d.join("keyring.toml"), &[("k1", &random_key_hex())], "k1");
        let pg = o.store_postgres.then(|| {
            let pg = pgstore::PgStore::start();
            pg.create_db("coffer");
            write_private(&d.join("store.password"), &pg.password).unwrap();
            pg
        });
        let store_table = match &pg {
            Some(pg) => format!(
                "[store]\nurl = {:?}\npassword_file = {:?}\n\n",
                pg.url_without_password("coffer"),
                d.join("store.password").display().to_string()
            ),
            None => String::new(),
        };
        let config = d.join("controller.toml");
        write_private(
            &config,
            format!(
                "listen = \"127.0.0.1:{api_port}\"\ndata_dir = {data:?}\nnats_url = {nats:?}\ntoken_file = {tokens:?}\n\
                 nats_creds = {creds:?}\n{nats_ca_line}\
                 heartbeat_expiry_s = {exp}\nlease_ms = {lease}\nbuild_timeout_s = {bt}\ndelete_grace_s = 20\n\
                 respawn_agents = {respawn}\nnats_replicas = {replicas}\n{agent_nats}\n\
                 {tls_table}{store_table}[nats_auth]\ndir = {auth:?}\n\n\
                 [replication]\nstrategy = {repl:?}\nauto_failover = {auto}\n\n\
                 [backup]\nkeyring_file = {keyring:?}\nstrategy = {strategy:?}\n{backup_extra}\n[backup.storage]\n{storage}\n\n\
                 {provisioner}",
                data = d.join("controller").display().to_string(),
                nats = nats_url,
                creds = d.join("nats-auth/controller.creds").display().to_string(),
                auth = d.join("nats-auth").display().to_string(),
                keyring = d.join("keyring.toml").display().to_string(),
                strategy = o.backup_strategy,
                backup_extra = o.backup_extra,
                respawn = o.respawn_agents,
                replicas = if o.nats_cluster { 3 } else { 1 },
                agent_nats = if o.nats_proxy {
                    format!("agent_nats_url = \"nats://127.0.0.1:{proxy_port}\"\n")
                } else if o.qemu_image.is_some() {
                    format!("agent_nats_url = \"nats://10.0.2.2:{nats_port}\"\n")
                } else {
                    String::new()
                },
                provisioner = match &o.qemu_image {
                    None if o.fake_vm => format!(
                        "[provisioner]\nkind = \"qemu\"\nimage = {image:?}\ninstances_dir = {inst:?}\n\
                         qemu_binary = {qemu:?}\ncontroller_url = \"http://127.0.0.1:{api_port}\"\n\
                         port_min = {inst_min}\nport_max = {inst_max}\nheartbeat_interval_ms = {hb}\n",
                        image = fake_image(d).display().to_string(),
                        qemu = bin("coffer-fake-qemu").display().to_string(),
                        inst = d.join("instances").display().to_string(),
                        hb = o.heartbeat_interval_ms,
                    ),
                    None => format!(
                        "[provisioner]\nkind = \"process\"\nagent_binary = {agent:?}\ninstances_dir = {inst:?}\n\
                         port_min = {inst_min}\nport_max = {inst_max}\nheartbeat_interval_ms = {hb}\ndatastore_extra = {extra:?}\n",
                        agent = d.join("bin/coffer-agent").display().to_string(),
                        inst = d.join("instances").display().to_string(),
                        hb = o.heartbeat_interval_ms,
                        extra = o.datastore_extra,
                    ),
                    Some(image) => format!(
                        "[provisioner]\nkind = \"qemu\"\nimage = {image:?}\ninstances_dir = {inst:?}\n\
                         controller_url = \"http://10.0.2.2:{api_port}\"\ncpus = 2\nmemory_mb = 1536\n\
                         port_min = {inst_min}\nport_max = {inst_max}\nheartbeat_interval_ms = {hb}\n",
                        image = image.display().to_string(),
                        inst = d.join("instances").display().to_string(),
                        hb = o.heartbeat_interval_ms,
                    ),
                },
                repl = o.replication_strategy,
                auto = o.auto_failover,
                storage = match o.backup_storage {
                    BackupStorage::Local => format!(
                        "kind = \"local\"\nroot = {:?}",
                        d.join("backups").display().to_string()
                    ),
                    BackupStorage::Nats { max_bytes } => format!(
                        "kind = \"nats\"\nbucket = \"{BACKUP_BUCKET}\"\n{}",
                        max_bytes.map(|m| format!("max_bytes = {m}")).unwrap_or_default()
                    ),
                },
                nats_ca_line = tls_lines.0,
                tls_table = tls_lines.1,
                tokens = d.join("tokens.toml").display().to_string(),
                exp = o.heartbeat_expiry_s,
                lease = o.lease_ms,
                bt = o.build_timeout_s,
            ),
        )
        .unwrap();
        // The NATS authority first: the server starts with authorization on.
        let out = Command::new(bin("coffer-controller"))
            .arg("--config")
            .arg(&config)
            .args(["manage", "nats-setup"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nats-setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tls_block = if o.tls {
            format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
                d.join("tls/server.pem").display().to_string(),
                d.join("tls/server.key").display().to_string()
            )
        } else {
            String::new()
        };
        let (nats, nats_peers) = if o.nats_cluster {
            let mut nodes = (0..3)
                .map(|i| {
                    let dir = if i == 0 {
                        d.to_path_buf()
                    } else {
                        d.join(format!("nats-n{}", i + 1))
                    };
                    std::fs::create_dir_all(&dir).unwrap();
                    let conf = nats_node_config(d, &dir, i, &route_ports, &tls_block);
                    Nats::start_no_wait(&dir, node_ports[i], Some(conf))
                })
                .collect::<Vec<_>>();
            for p in node_ports {
                wait_tcp(p, Duration::from_secs(20));
            }
            let first = nodes.remove(0);
            (first, nodes)
        } else if o.tls {
            let conf = d.join("nats-tls.conf");
            std::fs::write(
                &conf,
                format!("include \"nats-auth/server-auth.conf\"\n{tls_block}"),
            )
            .unwrap();
            (Nats::start(d, nats_port, Some(conf)), vec![])
        } else {
            let conf = d.join("nats-auth/server-auth.conf");
            (Nats::start(d, nats_port, Some(conf)), vec![])
        };
        register(&config);
        let mut env = Env {
            dir,
            nats,
            nats_peers,
            api_port,
            project,
            token,
            admin_token,
            other_token,
            third_token,
            http: reqwest::Client::new(),
            controller: None,
            config,
            backup_storage: o.backup_storage,
            proxy: o
                .nats_proxy
                .then(|| proxy::NatsProxy::start(proxy_port, nats_port)),
            pg,
        };
        env.start_controller();
        env
    }

    /// One text value read from the controller's store (`sql` takes one `$1` argument).
    pub async fn store_text(&self, sql: &str, arg: &str) -> String {
        use sqlx::Connection;
        match &self.pg {
            Some(pg) => {
                let mut db = sqlx::PgConnection::connect(&pg.url("coffer"))
                    .await
                    .unwrap();
                sqlx::query_scalar(sql)
                    .bind(arg)
                    .fetch_one(&mut db)
                    .await
                    .unwrap()
            }
            None => {
                let url = format!(
                    "sqlite://{}?mode=ro",
                    self.dir.path().join("controller/coffer.db").display()
                );
                let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query_scalar(sql)
                    .bind(arg)
                    .fetch_one(&mut db)
                    .await
                    .unwrap()
            }
        }
    }

    /// The controller's store URL (with the password for PostgreSQL).
    pub fn store_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url("coffer"),
            None => format!(
                "sqlite://{}",
                self.dir.path().join("controller/coffer.db").display()
            ),
        }
    }

    /// The controller's process id, while it runs.
    pub fn controller_pid(&self) -> Option<i32> {
        self.controller.as_ref().map(|c| c.id() as i32)
    }

    /// What gives the controller's store away: the SQLite file, or the PostgreSQL password file.
    pub fn store_secret_file(&self) -> PathBuf {
        match self.pg {
            Some(_) => self.dir.path().join("store.password"),
            None => self.dir.path().join("controller/coffer.db"),
        }
    }

    /// What the backup storage holds, as `owner/key`: every file (partial files included) for
    /// `local`; for `nats`, every committed object, plus `orphan chunks owner/key` for chunks
    /// no commit record refers to.
    pub async fn stored(&self) -> Vec<String> {
        match self.backup_storage {
            BackupStorage::Local => {
                fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
                    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            walk(root, &p, out);
                        } else if let Ok(rel) = p.strip_prefix(root) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                }
                let root = self.dir.path().join("backups");
                let mut out = vec![];
                walk(&root, &root, &mut out);
                out
            }
            BackupStorage::Nats { .. } => {
                use futures::{StreamExt, TryStreamExt};
                let js = async_nats::jetstream::new(self.nats_client().await);
                let prefix = format!("CFS_{BACKUP_BUCKET}_");
                let streams: Vec<String> = js
                    .stream_names()
                    .filter_map(|n| async move { n.ok() })
                    .collect()
                    .await;
                let mut names = Vec::new();
                for name in streams.iter().filter(|n| n.starts_with(&prefix)) {
                    let owner = &name[prefix.len()..];
                    let stream = js.get_stream(name).await.unwrap();
                    let subjects: Vec<(String, usize)> = stream
                        .info_with_subjects(">")
                        .await
                        .unwrap()
                        .try_collect()
                        .await
                        .unwrap();
                    // `cfs.<bucket>.<owner>.<base64 key>...`, or `...<owner>.a.<base64 rest>...`
                    // for an archived segment `archive/<rest>`.
                    let key_of = |subject: &str| -> String {
                        let toks: Vec<&str> = subject.split('.').collect();
                        let (prefix, tok) = match toks.get(3) {
                            Some(&"a") => ("archive/", toks.get(4)),
                            t => ("", t),
                        };
                        let key = String::from_utf8(
                            data_encoding::BASE64URL_NOPAD
                                .decode(tok.unwrap_or(&"").as_bytes())
                                .unwrap_or_default(),
                        )
                        .unwrap_or_default();
                        format!("{prefix}{key}")
                    };
                    let committed: std::collections::HashSet<String> = subjects
                        .iter()
                        .filter(|(s, n)| *n > 0 && s.ends_with(".m"))
                        .map(|(s, _)| key_of(s))
                        .collect();
                    let mut orphans = std::collections::BTreeSet::new();
                    for (s, n) in &subjects {
                        let k = key_of(s);
                        if *n > 0 && !s.ends_with(".m") && !committed.contains(&k) {
                            orphans.insert(k);
                        }
                    }
                    names.extend(committed.iter().map(|k| format!("{owner}/{k}")));
                    names.extend(orphans.iter().map(|k| format!("orphan chunks {owner}/{k}")));
                }
                names.sort();
                names
            }
        }
    }

    /// The storage of `owner`'s objects with the controller's rights (on a blocking thread).
    async fn with_storage<T: Send + 'static>(
        &self,
        owner: &str,
        f: impl FnOnce(&dyn coffer_strategies::storage::Storage) -> T + Send + 'static,
    ) -> T {
        let kind = match self.backup_storage {
            BackupStorage::Local => coffer_strategies::storage::StorageKind::Local {
                root: self.dir.path().join("backups"),
            },
            BackupStorage::Nats { max_bytes } => coffer_strategies::storage::StorageKind::Nats {
                bucket: BACKUP_BUCKET.into(),
                max_bytes,
            },
        };
        let client = self.nats_client().await;
        let owner = owner.to_string();
        tokio::task::spawn_blocking(move || {
            let s = kind
                .build(
                    Some(&client),
                    &owner,
                    coffer_strategies::storage::Access::Controller,
                )
                .unwrap();
            f(s.as_ref())
        })
        .await
        .unwrap()
    }

    /// Reads `owner`'s stored object whole.
    pub async fn read_object(&self, owner: &str, key: &str) -> Vec<u8> {
        let key = key.to_string();
        self.with_storage(owner, move |s| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut s.open(&key).unwrap(), &mut v).unwrap();
            v
        })
        .await
    }

    /// Replaces `owner`'s stored object (to damage it), as only the controller's rights can.
    pub async fn write_object(&self, owner: &str, key: &str, bytes: &[u8]) {
        let (key, bytes) = (key.to_string(), bytes.to_vec());
        self.with_storage(owner, move |s| {
            s.delete(&key).unwrap();
            let mut w = s.create(&key).unwrap();
            std::io::Write::write_all(&mut w, &bytes).unwrap();
            w.commit().unwrap();
        })
        .await
    }

    /// Every NATS server's URL (one, or the cluster's three).
    pub fn nats_urls(&self) -> Vec<String> {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .map(|n| n.url())
            .collect()
    }

    /// A NATS client with the controller's credentials (full rights in the Coffer account).
    pub async fn nats_client(&self) -> async_nats::Client {
        let mut o = async_nats::ConnectOptions::with_credentials_file(
            self.dir.path().join("nats-auth/controller.creds"),
        )
        .await
        .unwrap();
        let ca = self.dir.path().join("tls/ca.pem");
        if ca.exists() {
            o = o.add_root_certificates(ca).require_tls(true);
        }
        let servers: Vec<async_nats::ServerAddr> = self
            .nats_urls()
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        o.connect(servers).await.unwrap()
    }

    /// Path of an instance agent's NATS credentials.
    pub fn agent_creds(&self, id: &str) -> PathBuf {
        self.instance_dir(id).join("agent.creds")
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn start_controller(&mut self) {
        self.start_controller_with(&[]);
    }

    /// Starts the controller with extra environment (a test hook such as
    /// `COFFER_TEST_FAILPOINT`).
    pub fn start_controller_with(&mut self, vars: &[(&str, &str)]) {
        let child = spawn_controller(&self.config, &self.dir.path().join("controller.log"), vars);
        self.controller = Some(child);
        wait_tcp(self.api_port, Duration::from_secs(30));
    }

    /// Waits for the controller to exit by itself (a failpoint aborted it); panics after
    /// `timeout`.
    pub async fn wait_controller_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let c = self.controller.as_mut().expect("a controller runs");
        loop {
            if c.try_wait().expect("waiting for the controller").is_some() {
                self.controller = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not exit within {timeout:?}\n{}",
                self.controller_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts another controller on the same store, NATS and keys (its own API port, its own
    /// `controller_id`), as an operator runs several; `vars` as for `start_controller_with`.
    pub fn start_peer_controller(&self, name: &str, vars: &[(&str, &str)]) -> PeerController {
        let port = alloc_ports(1)[0];
        let text = std::fs::read_to_string(&self.config).unwrap().replace(
            &format!("listen = \"127.0.0.1:{}\"", self.api_port),
            &format!("controller_id = {name:?}\nlisten = \"127.0.0.1:{port}\""),
        );
        let config = self.dir.path().join(format!("controller-{name}.toml"));
        write_private(&config, text).unwrap();
        let log_path = self.dir.path().join(format!("controller-{name}.log"));
        let child = spawn_controller(&config, &log_path, vars);
        wait_tcp(port, Duration::from_secs(30));
        PeerController {
            port,
            base: format!("http://127.0.0.1:{port}/v1.0/{}", self.project),
            log: log_path,
            child: Some(child),
        }
    }

    /// Kills the controller at once (SIGKILL: a host lost), leaving agents and databases.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the controller with SIGTERM (agents and databases keep running).
    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/v1.0/{}", self.api_port, self.project)
    }

    /// A request with the user token; returns status and JSON body (Null when empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(
            &self.token.clone(),
            method,
            &format!("{}{}", self.base(), path),
            body,
        )
        .await
    }

    pub async fn call_as(
        &self,
        token: &str,
        method: &str,
        url: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, url).header("X-Auth-Token", token);
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.expect("HTTP request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_server_error() {
            // The controller logs the cause under the error id the body carries; a failing test
            // shows both (its output is printed only when it fails).
            println!(
                "{method} {url} answered {status}: {v}\n{}",
                self.controller_log()
            );
        }
        (status, v)
    }

    pub async fn raw(&self, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = self
            .http
            .request(m, format!("{}{}", self.base(), path))
            .header("X-Auth-Token", &self.token)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates an instance with one database and one user; returns its id.
    pub async fn create(&self, name: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/instances",
                Some(json!({"instance": {
                    "name": name, "flavorRef": "1", "volume": {"size": 1},
                    "databases": [{"name": "shop"}],
                    "users": [{"name": "app", "password": "s3cret-Pw", "databases": [{"name": "shop"}]}],
                }})),
            )
            .await;
        assert_eq!(
            st,
            StatusCode::OK,
            "create failed: {v}\n--- controller.log ---\n{}",
            std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
        );
        assert_eq!(v["instance"]["status"], "BUILD", "{v}");
        v["instance"]["id"].as_str().unwrap().to_string()
    }

    /// Creates an instance (see [`Env::create`]), waits for ACTIVE and fills table `shop.t`
    /// (`i INT PRIMARY KEY`) with `rows` as the app user; returns its id and view.
    pub async fn active_with_rows(&self, name: &str, rows: &[i32]) -> (String, Value) {
        use sqlx::Connection;
        let id = self.create(name).await;
        let view = self
            .wait_status(&id, "ACTIVE", Duration::from_secs(120))
            .await;
        let mut c = self.connect(&view, "app", "s3cret-Pw", "shop").await;
        sqlx::query("CREATE TABLE t (i INT PRIMARY KEY)")
            .execute(&mut c)
            .await
            .unwrap();
        for r in rows {
            sqlx::query("INSERT INTO t VALUES (?)")
                .bind(r)
                .execute(&mut c)
                .await
                .unwrap();
        }
        c.close().await.unwrap();
        (id, view)
    }

    pub async fn show(&self, id: &str) -> (StatusCode, Value) {
        self.call("GET", &format!("/instances/{id}"), None).await
    }

    /// Polls (every 10 ms) until the instance has `status`; panics with the last view otherwise.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let (st, v) = self.show(id).await;
            if st == StatusCode::OK && v["instance"]["status"] == status {
                return v["instance"].clone();
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "instance {id} did not reach {status} within {timeout:?}; last: {last}\n{}",
            self.logs(id)
        );
    }

    /// Polls a backup until its status is `want` (a FAILED one fails the test unless wanted);
    /// returns its view.
    pub async fn wait_backup(&self, id: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (st, v) = self.call("GET", &format!("/backups/{id}"), None).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let s = v["backup"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if s == want {
                return v["backup"].clone();
            }
            assert!(s != "FAILED" || want == "FAILED", "backup failed: {v}");
            assert!(Instant::now() < deadline, "backup {id} not {want}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a restore drill of `instance` (`POST /restore_drills`, 202); returns its id.
    pub async fn start_drill(&self, instance: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/restore_drills",
                Some(json!({"restore_drill": {"instance": instance}})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["restore_drill"]["status"], "RUNNING", "{v}");
        v["restore_drill"]["id"].as_str().unwrap().to_string()
    }

    /// Waits until restore drill `id` finished (PASSED or FAILED); returns what
    /// `GET /restore_drills/{id}` answered.
    pub async fn wait_drill(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let (st, v) = self
                .call("GET", &format!("/restore_drills/{id}"), None)
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if v["restore_drill"]["status"] != "RUNNING" {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "restore drill {id} did not finish: {v}\n{}",
                self.controller_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until `pred` holds for the instance view.
    pub async fn wait_for(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let (_, v) = self.show(id).await;
            if pred(&v["instance"]) {
                return v["instance"].clone();
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "instance {id}: {what} not seen within {timeout:?}; last: {last}\n{}",
            self.logs(id)
        );
    }

    /// `POST /instances/{id}/action` with `body` (`{"restart": {}}`, ...).
    pub async fn action(&self, id: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", &format!("/instances/{id}/action"), Some(body))
            .await
    }

    /// `POST /instances/{id}/action {"restart": {}}`.
    pub async fn restart(&self, id: &str) -> (StatusCode, Value) {
        self.action(id, json!({"restart": {}})).await
    }

    /// Deletes the instance and waits until the API answers 404, its processes are gone
    /// (whatever the server did with SIGTERM) and so is its Unix user.
    pub async fn delete_and_wait_gone(&self, id: &str) {
        let gone = self.running_of(id);
        let (st, v) = self.call("DELETE", &format!("/instances/{id}"), None).await;
        assert_eq!(st, StatusCode::ACCEPTED, "delete: {v}");
        self.wait_gone(gone).await;
    }

    /// An instance's Unix user and its processes now, for [`Env::wait_gone`] after a delete:
    /// once the user is removed its uid may be given to another test's instance, so the uid
    /// alone does not say whose a process is.
    pub fn running_of(&self, id: &str) -> Running {
        let user = instance_user(id);
        let pids = user
            .as_ref()
            .map(|(_, uid)| processes_of(*uid))
            .unwrap_or_default();
        Running {
            id: id.to_string(),
            user,
            pids,
        }
    }

    /// Waits until a deleted instance answers 404, none of its processes runs (whatever the
    /// server did with SIGTERM) and its Unix user is gone.
    pub async fn wait_gone(&self, running: Running) {
        let Running {
            id,
            user,
            pids: before,
        } = running;
        let id = id.as_str();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.show(id).await.0 != StatusCode::NOT_FOUND {
            assert!(
                Instant::now() < deadline,
                "instance {id} not deleted\n{}",
                self.logs(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some((name, uid)) = user else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exists = nix::unistd::User::from_name(&name).ok().flatten().is_some();
            let left: Vec<i32> = processes_of(uid)
                .into_iter()
                .filter(|p| exists || before.contains(p))
                .collect();
            let dir = self.instance_dir(id).exists();
            if left.is_empty() && !exists && !dir {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance {id}'s processes, user {name} or directory (still there: {dir}) outlived its delete: {:?}",
                left.iter()
                    .map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("instances").join(id)
    }

    pub fn agent_pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.instance_dir(id).join("state/agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn db_pid(&self, id: &str) -> Option<i32> {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(self.instance_dir(id).join("state/db.json")).ok()?,
        )
        .ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }

    /// Number of intent records of `kind` the agent keeps (each intent handled once).
    pub fn agent_intents(&self, id: &str, kind: &str) -> usize {
        let Ok(rd) = std::fs::read_dir(self.instance_dir(id).join("state/intents")) else {
            return 0;
        };
        rd.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter(|t| t.contains(&format!("\"kind\":\"{kind}\"")))
            .count()
    }

    /// The last lines of the controller's log, for failure messages.
    pub fn controller_log(&self) -> String {
        tail_of(&self.dir.path().join("controller.log"), 30)
    }

    /// The controller's log and every instance's agent log, tails, for a failed test.
    pub fn failure_logs(&self) -> String {
        let mut out = vec![tail_of(&self.dir.path().join("controller.log"), 80)];
        let rd = std::fs::read_dir(self.dir.path().join("instances"));
        for e in rd.into_iter().flatten().flatten() {
            out.push(tail_of(&e.path().join("agent.log"), 40));
        }
        out.join("\n")
    }

    /// Tails of the logs, for failure messages.
    pub fn logs(&self, id: &str) -> String {
        [
            self.dir.path().join("controller.log"),
            self.instance_dir(id).join("agent.log"),
            self.instance_dir(id).join("state/mariadb/mariadbd.err"),
            self.instance_dir(id).join("state/mariadb/mariadbd.out"),
        ]
        .iter()
        .map(|p| tail_of(p, 15))
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// A client connection using only what the API shows (ip + port) and the user's credentials.
    pub async fn connect(
        &self,
        view: &Value,
        user: &str,
        password: &str,
        db: &str,
    ) -> sqlx::MySqlConnection {
        use sqlx::ConnectOptions;
        let host = view["ip"][0].as_str().expect("the API shows an ip");
        let port = view["port"].as_u64().expect("the API shows a port") as u16;
        sqlx::mysql::MySqlConnectOptions::new()
            .host(host)
            .port(port)
            .username(user)
            .password(password)
            .database(db)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {host}:{port} as {user}: {e}"))
    }
}

impl Env {
    /// The `i` column of table `shop.t`, in order, read as the app user (see
    /// [`Env::active_with_rows`]).
    pub async fn rows(&self, view: &Value) -> Vec<i32> {
        use sqlx::{Connection, Row};
        let mut c = self.connect(view, "app", "s3cret-Pw", "shop").await;
        let v = sqlx::query("SELECT i FROM t ORDER BY i")
            .fetch_all(&mut c)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        c.close().await.unwrap();
        v
    }

    /// SIGKILLs an instance's agent and waits until the controller has started a new one.
    pub async fn replace_agent(&self, id: &str) {
        let agent = self.agent_pid(id).expect("the agent runs");
        kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .agent_pid(id)
            .is_none_or(|p| p == agent || !pid_alive(p))
        {
            assert!(Instant::now() < deadline, "no new agent for {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent's own admin session on an instance's server (through its socket): for tests
    /// that must reach into replication.
    pub async fn admin_connect(&self, id: &str) -> sqlx::MySqlConnection {
        use sqlx::ConnectOptions;
        let root = self.instance_dir(id).join("state/mariadb");
        let cnf = std::fs::read_to_string(root.join("my.cnf")).unwrap();
        let socket = cnf
            .lines()
            .find_map(|l| l.strip_prefix("socket = "))
            .expect("socket in my.cnf")
            .to_string();
        let pw = std::fs::read_to_string(root.join("admin.password")).unwrap();
        sqlx::mysql::MySqlConnectOptions::new()
            .socket(socket)
            .username("coffer_admin")
            .password(pw.trim())
            .connect()
            .await
            .unwrap()
    }
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Makes a CA and a server certificate for 127.0.0.1/localhost (`xtask tls-ca`, as the demo).
pub fn make_test_ca(dir: &Path) {
    let out = Command::new(bin("xtask"))
        .arg("tls-ca")
        .arg(dir)
        .output()
        .expect("running xtask tls-ca");
    assert!(
        out.status.success(),
        "xtask tls-ca: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 64 hex characters from the OS's randomness.
pub fn random_key_hex() -> String {
    let mut b = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a file only its owner may read (0600).
pub fn write_private(path: &Path, text: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_ref())
}

/// Writes a backup keyring file (0600).
pub fn write_keyring(path: &Path, keys: &[(&str, &str)], current: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = format!("current = \"{current}\"\n[keys]\n");
    for (id, hex) in keys {
        text.push_str(&format!("{id} = \"{hex}\"\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

/// The current UTC time as the API shows it (`2026-11-28T08:15:11`), to compare with
/// `service_status_updated`.
pub fn now_rfc3339() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A datastore's system log `name`: listed, published by an admin (a tenant is refused) and
/// its tail holds `expect`.
pub async fn check_sys_log(env: &Env, id: &str, name: &str, expect: &str) {
    let base = format!("{}/instances/{id}/log", env.base());
    let (_, l) = env.call_as(&env.admin_token, "GET", &base, None).await;
    let listed = l["logs"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["name"] == name && x["type"] == "SYS"));
    assert!(listed, "{name} listed as SYS: {l}");
    let (st, _) = env
        .call(
            "POST",
            &format!("/instances/{id}/log"),
            Some(json!({"name": name, "publish": 1})),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "a tenant publishing a system log"
    );
    let (st, p) = env
        .call_as(
            &env.admin_token,
            "POST",
            &base,
            Some(json!({"name": name, "publish": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{p}");
    assert!(p["log"]["published"].as_u64().unwrap_or(0) > 0, "{p}");
    let (st, t) = env
        .call_as(
            &env.admin_token,
            "GET",
            &format!("{base}/{name}/tail?lines=200"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let found = t["lines"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or("").contains(expect)));
    assert!(found, "'{expect}' in the tail of {name}: {t}");
}

/// Registers datastore `name` (manager of the same name) with version `label` = `full` as its
/// default version.
fn register_datastore(config: &Path, name: &str, label: &str, full: &str) {
    for args in [
        vec!["datastore-update", name],
        vec!["datastore-version-update", name, label, name, full],
        vec!["datastore-default-version", name, label],
        // The bundled parameter rules (configuration groups).
        vec!["datastore-parameters-load", name, label],
    ] {
        let out = Command::new(bin("coffer-controller"))
            .arg("--config")
            .arg(config)
            .arg("manage")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "manage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Registers PostgreSQL (the newest installed under /usr/lib/postgresql) as datastore
/// `postgresql`, version label = its major version (e.g. `15`); returns the label.
pub fn register_postgresql(config: &Path) -> String {
    let major = pgstore::pg_major();
    let out = Command::new(pgstore::pg_bin("postgres"))
        .arg("--version")
        .output()
        .unwrap();
    let full = coffer_strategies::datastore::postgresql::parse_version(&String::from_utf8_lossy(
        &out.stdout,
    ))
    .expect("postgres --version names its version");
    let label = major.to_string();
    register_datastore(config, "postgresql", &label, &full);
    label
}

/// Registers Redis (the installed redis-server) as datastore `redis`, version label = its
/// major.minor (e.g. `7.0`); returns the label.
pub fn register_redis(config: &Path) -> String {
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .expect("redis-server is installed (cargo xtask test installs it)");
    let full =
        coffer_strategies::datastore::redis::parse_version(&String::from_utf8_lossy(&out.stdout))
            .expect("redis-server --version names its version");
    let label: String = full.split('.').take(2).collect::<Vec<_>>().join(".");
    register_datastore(config, "redis", &label, &full);
    label
}

/// Registers MariaDB (the installed version) and the test flavors.
pub fn register(config: &Path) {
    let out = Command::new("/usr/sbin/mariadbd")
        .arg("--version")
        .output()
        .expect("mariadbd --version");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let full: String = text
        .split("Ver ")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let label: String = full.split('.').take(2).collect::<Vec<_>>().join(".");
    let manage = |args: &[&str]| {
        let out = Command::new(bin("coffer-controller"))
            .arg("--config")
            .arg(config)
            .arg("manage")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "manage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    manage(&["datastore-update", "mariadb"]);
    manage(&[
        "datastore-version-update",
        "mariadb",
        &label,
        "mariadb",
        &full,
    ]);
    manage(&["datastore-default-version", "mariadb", &label]);
    manage(&["datastore-parameters-load", "mariadb", &label]);
    manage(&["flavor-create", "1", "coffer.tiny", "256", "1", "1"]);
    manage(&["flavor-create", "2", "coffer.small", "512", "1", "2"]);
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failing test shows what every process said last: the cause of a wait that ran out
        // is in a log, and CI keeps only the test's output.
        if std::thread::panicking() {
            eprintln!("{}", self.failure_logs());
        }
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Instances with a Unix user of their own, found by the user's name (a uid another
        // test's instance was given after this one's user went is not this test's): everything
        // they run goes (a Redis server renames itself, so it cannot be found by its command
        // line). Their users are removed last, so no uid is handed out again while this
        // teardown still kills by it.
        let mut users = vec![];
        let rd = std::fs::read_dir(self.dir.path().join("instances"));
        for e in rd.into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if let Some((name, uid)) = instance_user(&id) {
                users.push((name, uid));
                for _ in 0..100 {
                    let left = processes_of(uid);
                    if left.is_empty() {
                        break;
                    }
                    for p in left {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
            if let Some(p) = self.agent_pid(&id) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let pidfile = e.path().join("state/mariadb/mariadbd.pid");
            let pids = [
                self.db_pid(&id),
                // A VM (the qemu provisioner).
                std::fs::read_to_string(e.path().join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
                std::fs::read_to_string(pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
            ];
            for p in pids.into_iter().flatten() {
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*self.dir.path().to_string_lossy()) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        // Nothing the test started runs on: no instance's process, nothing from its directory.
        if let Some(mut c) = self.nats.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = self.dir.path().to_string_lossy().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let left = loop {
            let left: Vec<i32> = users
                .iter()
                .flat_map(|(_, u)| processes_of(*u))
                .chain(processes_mentioning(&dir))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            for p in &left {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (name, _) in &users {
            let _ = Command::new("userdel").arg(name).status();
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes the test started outlived it: {left:?}");
        }
    }
}

/// The last `n` lines of a log file under a header naming it, for failure messages.
fn tail_of(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    format!(
        "--- {} (last {n} lines) ---\n{}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}

/// What of an instance runs, taken before it is deleted ([`Env::running_of`]).
pub struct Running {
    id: String,
    user: Option<(String, u32)>,
    pids: Vec<i32>,
}

/// The Unix user the controller made for an instance (name and uid), if it exists.
pub fn instance_user(id: &str) -> Option<(String, u32)> {
    let hash = data_encoding::HEXLOWER.encode(&openssl::sha::sha256(id.as_bytes()));
    let name = format!("coffer-{}", &hash[..12]);
    let u = nix::unistd::User::from_name(&name).ok()??;
    Some((name, u.uid.as_raw()))
}

/// Live processes (not zombies) running as `uid`.
pub fn processes_of(uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    live_processes(|p| p.metadata().is_ok_and(|m| m.uid() == uid))
}

/// Live processes but this one whose command line mentions `text` (a test's directory, a fake
/// VM's).
pub fn processes_mentioning(text: &str) -> Vec<i32> {
    let me = std::process::id().to_string();
    live_processes(|p| {
        p.file_name() != me.as_str()
            && std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
    })
}

/// The pids of live processes (not zombies) whose `/proc` entry passes `keep`.
fn live_processes(keep: impl Fn(&std::fs::DirEntry) -> bool) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (state != 'Z' && keep(&p)).then_some(pid)
        })
        .collect()
}

/// Sends a heartbeat request and waits for the controller's answer, asking again when none
/// comes: the controller drops an instance's heartbeats that follow its last one within a
/// quarter interval (flood protection), and the instance's own agent keeps sending too. The
/// wait (0.7 s) is not a multiple of the agents' interval, so a retry never lands in the same
/// phase of the agent's heartbeats as the try before it.
pub const HEARTBEAT_RETRY: Duration = Duration::from_millis(700);

pub async fn heartbeat_request(
    client: &async_nats::Client,
    instance: &str,
    payload: Vec<u8>,
) -> async_nats::Message {
    let mut tries = 0;
    loop {
        let r = tokio::time::timeout(
            HEARTBEAT_RETRY,
            client.request(
                coffer_proto::subjects::heartbeat(instance),
                payload.clone().into(),
            ),
        )
        .await;
        match r {
            Ok(Ok(reply)) => return reply,
            other => {
                tries += 1;
                assert!(tries < 15, "the controller never answered: {other:?}");
            }
        }
    }
}
