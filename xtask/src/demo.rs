//! `cargo xtask demo`: nats-server (JetStream) + the controller (SQLite, or with
//! `--store postgres` a PostgreSQL server of its own; process provisioner) with MariaDB
//! registered, in the foreground. Ports, tokens and keys persist under `.coffer/`, so a
//! second run resumes the same instances with their data.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

use crate::env;

/// Settings kept across runs.
struct Persisted {
    nats_port: u16,
    api_port: u16,
    project: String,
    token: String,
    admin_token: String,
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn load_or_create(dir: &Path) -> anyhow::Result<Persisted> {
    let f = dir.join("demo.state");
    if let Ok(text) = std::fs::read_to_string(&f) {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(String::from)
                .with_context(|| format!("{} lacks {k}; remove it to start afresh", f.display()))
        };
        return Ok(Persisted {
            nats_port: get("nats_port")?.parse()?,
            api_port: get("api_port")?.parse()?,
            project: get("project")?,
            token: get("token")?,
            admin_token: get("admin_token")?,
        });
    }
    let p = Persisted {
        nats_port: free_port()?,
        api_port: free_port()?,
        project: random_hex(16)?,
        token: random_hex(24)?,
        admin_token: random_hex(24)?,
    };
    write_private(
        &f,
        &format!(
            "nats_port={}\napi_port={}\nproject={}\ntoken={}\nadmin_token={}\n",
            p.nats_port, p.api_port, p.project, p.token, p.admin_token
        ),
    )?;
    Ok(p)
}

/// Writes a 0600 file atomically (readers never see it half-written).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn wait_port(port: u16, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited ({st}) while starting; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{what} did not listen on port {port} within 60 s; see {}",
        log.display()
    )
}

fn spawn_logged(mut c: Command, log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    // Own process group: Ctrl-C reaches only xtask, which stops everything in order.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    Ok(c.spawn()?)
}

fn stop(child: &mut Child, what: &str, timeout: Duration) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            eprintln!("xtask: {what} stopped");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("xtask: {what} did not stop in {timeout:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn mariadb_version() -> anyhow::Result<String> {
    let out = Command::new("/usr/sbin/mariadbd")
        .arg("--version")
        .output()
        .context("running mariadbd --version")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: String = text
        .split("Ver ")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if v.is_empty() {
        bail!("cannot read the MariaDB version from: {text}");
    }
    Ok(v)
}

/// A CA and a server certificate for 127.0.0.1/localhost (openssl CLI), made once.
pub fn make_ca(dir: &Path) -> anyhow::Result<()> {
    if dir.join("server.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    env::step("making a local CA and a certificate for 127.0.0.1 (--tls)");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "825",
        "-subj",
        "/CN=coffer demo CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "825",
        "-extfile",
        "san.ext",
    ])?;
    // The private keys are the operator's alone (instances run as other users).
    for key in ["ca.key", "server.key"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Each instance runs as a Unix user of its own (when this runs as root): the agent binary goes
/// into `dir/bin`, where those users can run it, and `dir` lets them through to their own
/// instance (its files are 0600; the controller's data dir is 0700). Returns its path.
pub fn place_agent(bin_dir: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let agent_bin = dir.join("bin/coffer-agent");
    std::fs::create_dir_all(dir.join("bin"))?;
    let _ = std::fs::remove_file(&agent_bin);
    let built = bin_dir.join("coffer-agent");
    if std::fs::hard_link(&built, &agent_bin).is_err() {
        std::fs::copy(&built, &agent_bin)
            .with_context(|| format!("copying {}", built.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    Ok(agent_bin)
}

/// Authorization on: the controller holds the NATS authority and gives every agent its own
/// identity; `manage nats-setup` (idempotent) writes the server's side of it.
pub fn nats_setup(controller: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(controller)
        .arg("--config")
        .arg(config)
        .args(["manage", "nats-setup"])
        .output()?;
    if !out.status.success() {
        bail!(
            "coffer-controller manage nats-setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Registers MariaDB (installed version), PostgreSQL and Redis when installed, and small
/// flavors; safe to repeat.
pub fn register(controller: &Path, config: &Path) -> anyhow::Result<String> {
    let full = mariadb_version()?;
    let label: String = full.split('.').take(2).collect::<Vec<_>>().join(".");
    let manage = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(controller)
            .arg("--config")
            .arg(config)
            .arg("manage")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "coffer-controller manage {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    manage(&["datastore-update", "mariadb"])?;
    manage(&[
        "datastore-version-update",
        "mariadb",
        &label,
        "mariadb",
        &full,
    ])?;
    manage(&["datastore-default-version", "mariadb", &label])?;
    manage(&["datastore-parameters-load", "mariadb", &label])?;
    // PostgreSQL and Redis too, when installed.
    let output = |prog: &str| -> Option<String> {
        let o = Command::new(prog).arg("--version").output().ok()?;
        Some(String::from_utf8_lossy(&o.stdout).to_string())
    };
    if let Some((major, pg_bin)) = env::postgresql() {
        if let Some(full) = output(&pg_bin.join("postgres").display().to_string()).and_then(|t| {
            Some(
                t.split("(PostgreSQL) ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        }) {
            let m = major.to_string();
            manage(&["datastore-update", "postgresql"])?;
            manage(&[
                "datastore-version-update",
                "postgresql",
                &m,
                "postgresql",
                &full,
            ])?;
            manage(&["datastore-default-version", "postgresql", &m])?;
            if manage(&["datastore-parameters-load", "postgresql", &m]).is_err() {
                eprintln!("xtask: no configuration parameters are bundled for PostgreSQL {full}; its configuration groups stay off");
            }
        }
    }
    if let Some(full) = output("redis-server")
        .and_then(|t| Some(t.split("v=").nth(1)?.split_whitespace().next()?.to_string()))
    {
        let l: String = full.split('.').take(2).collect::<Vec<_>>().join(".");
        manage(&["datastore-update", "redis"])?;
        manage(&["datastore-version-update", "redis", &l, "redis", &full])?;
        manage(&["datastore-default-version", "redis", &l])?;
        if manage(&["datastore-parameters-load", "redis", &l]).is_err() {
            eprintln!("xtask: no configuration parameters are bundled for Redis {full}; its configuration groups stay off");
        }
    }
    for (id, name, ram, vcpus, disk) in [
        ("1", "coffer.tiny", "256", "1", "2"),
        ("2", "coffer.small", "512", "1", "5"),
        ("3", "coffer.medium", "1024", "2", "10"),
    ] {
        manage(&["flavor-create", id, name, ram, vcpus, disk])?;
    }
    Ok(label)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut dir = env::root().join(".coffer");
    let mut build = true;
    let mut tls = false;
    let mut nats_storage = false;
    let mut pg_store = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = PathBuf::from(it.next().context("--dir needs a path")?),
            "--no-build" => build = false,
            "--tls" => tls = true,
            "--storage" => match it.next().map(String::as_str) {
                Some("local") => nats_storage = false,
                Some("nats") => nats_storage = true,
                other => bail!(
                    "--storage takes local (a directory, the default) or nats (the JetStream object store), not {other:?}"
                ),
            },
            "--store" => match it.next().map(String::as_str) {
                Some("sqlite") => pg_store = false,
                Some("postgres") => pg_store = true,
                other => bail!(
                    "--store takes sqlite (a file, the default) or postgres (a PostgreSQL server the demo runs), not {other:?}"
                ),
            },
            other => bail!(
                "unknown demo option '{other}' (known: --dir DIR, --no-build, --tls, --storage local|nats, --store sqlite|postgres)"
            ),
        }
    }
    // Block SIGINT/SIGTERM now; they are awaited below (children get a clean mask from std).
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()?;

    let mut tools = env::prepare()?;
    if build {
        env::step("building coffer-controller and coffer-agent");
        env::cargo(&["build", "--workspace", "--bins"])?;
    } else if let Ok(d) = std::env::var("COFFER_BIN_DIR") {
        tools.bin_dir = PathBuf::from(d);
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let p = load_or_create(&dir)?;
    let controller_bin = tools.bin_dir.join("coffer-controller");
    let agent_bin = place_agent(&tools.bin_dir, &dir)?;

    write_private(
        &dir.join("tokens.toml"),
        &format!(
            "[[token]]\ntoken = \"{}\"\nproject = \"{}\"\n\n[[token]]\ntoken = \"{}\"\nproject = \"{}\"\nadmin = true\n",
            p.token, p.project, p.admin_token, p.project
        ),
    )?;
    // --tls: a local CA and a certificate for 127.0.0.1, used by NATS and the API.
    let tls_dir = dir.join("tls");
    let (ca_line, tls_table) = if tls {
        make_ca(&tls_dir)?;
        (
            format!(
                "nats_ca_file = {:?}\n",
                tls_dir.join("ca.pem").display().to_string()
            ),
            format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n\n",
                tls_dir.join("server.pem").display().to_string(),
                tls_dir.join("server.key").display().to_string()
            ),
        )
    } else {
        (String::new(), String::new())
    };
    // The operator's backup key, made once (0600); back it up: without it backups cannot be read.
    let keyring = dir.join("backup-keyring.toml");
    if !keyring.exists() {
        write_private(
            &keyring,
            &format!("current = \"k1\"\n[keys]\nk1 = \"{}\"\n", random_hex(32)?),
        )?;
    }
    // --store postgres: the controller's store on a PostgreSQL server the demo runs.
    let mut pg = None;
    let store_table = if pg_store {
        let (child, port) = start_pg_store(&dir)?;
        pg = Some(child);
        format!(
            "[store]\nurl = \"postgres://coffer@127.0.0.1:{port}/coffer\"\npassword_file = {:?}\n\n",
            dir.join("store.password").display().to_string()
        )
    } else {
        String::new()
    };
    let stop_pg = |pg: &mut Option<Child>| {
        if let Some(c) = pg.as_mut() {
            stop(c, "the store's PostgreSQL", Duration::from_secs(30));
        }
    };
    let config = dir.join("controller.toml");
    write_private(
        &config,
        &format!(
            "listen = \"127.0.0.1:{api}\"\ndata_dir = {data:?}\nnats_url = \"nats://127.0.0.1:{nats}\"\ntoken_file = {tokens:?}\n\
             stop_agents_on_exit = true\ndefault_datastore = \"mariadb\"\nnats_creds = {creds:?}\n{ca_line}\n{tls_table}{store_table}[nats_auth]\ndir = {auth:?}\n\n\
             [backup]\nkeyring_file = {keyring:?}\n[backup.storage]\n{storage}\n\n\
             [provisioner]\nkind = \"process\"\nagent_binary = {agent:?}\ninstances_dir = {inst:?}\n\
             port_min = 13306\nport_max = 13405\n",
            api = p.api_port,
            data = dir.join("controller").display().to_string(),
            nats = p.nats_port,
            creds = dir.join("nats-auth/controller.creds").display().to_string(),
            auth = dir.join("nats-auth").display().to_string(),
            tokens = dir.join("tokens.toml").display().to_string(),
            agent = agent_bin.display().to_string(),
            inst = dir.join("instances").display().to_string(),
            keyring = dir.join("backup-keyring.toml").display().to_string(),
            storage = if nats_storage {
                "kind = \"nats\"\nbucket = \"coffer-backups\"".to_string()
            } else {
                format!(
                    "kind = \"local\"\nroot = {:?}",
                    dir.join("backups").display().to_string()
                )
            },
        ),
    )?;

    env::step(&format!("starting nats-server on port {}", p.nats_port));
    let nats_log = dir.join("nats.log");
    nats_setup(&controller_bin, &config)?;
    let nats_conf = if tls {
        let conf = dir.join("nats-tls.conf");
        std::fs::write(
            &conf,
            format!(
                "include \"nats-auth/server-auth.conf\"\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
                tls_dir.join("server.pem").display().to_string(),
                tls_dir.join("server.key").display().to_string()
            ),
        )?;
        conf
    } else {
        dir.join("nats-auth/server-auth.conf")
    };
    let mut nats_cmd = Command::new(&tools.nats_server);
    nats_cmd
        .arg("-c")
        .arg(&nats_conf)
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &p.nats_port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(dir.join("nats"));
    let mut nats = spawn_logged(nats_cmd, &nats_log)?;
    wait_port(p.nats_port, "nats-server", &mut nats, &nats_log)?;

    let label = register(&controller_bin, &config)?;
    env::step(&format!(
        "starting coffer-controller on port {}",
        p.api_port
    ));
    let ctl_log = dir.join("controller.log");
    let mut ctl_cmd = Command::new(&controller_bin);
    ctl_cmd.arg("--config").arg(&config).arg("serve");
    let mut controller = match spawn_logged(ctl_cmd, &ctl_log) {
        Ok(c) => c,
        Err(e) => {
            stop(&mut nats, "nats-server", Duration::from_secs(10));
            stop_pg(&mut pg);
            return Err(e);
        }
    };
    if let Err(e) = wait_port(p.api_port, "coffer-controller", &mut controller, &ctl_log) {
        stop(&mut nats, "nats-server", Duration::from_secs(10));
        stop_pg(&mut pg);
        return Err(e);
    }

    let scheme = if tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://127.0.0.1:{}/v1.0/{}", p.api_port, p.project);
    let ca_env = if tls {
        format!(
            "COFFER_CA_FILE={}\nREQUESTS_CA_BUNDLE={}\n",
            tls_dir.join("ca.pem").display(),
            tls_dir.join("ca.pem").display()
        )
    } else {
        String::new()
    };
    write_private(
        &dir.join("demo.env"),
        &format!(
            "COFFER_ENDPOINT={endpoint}\nCOFFER_PROJECT={}\nCOFFER_TOKEN={}\nCOFFER_ADMIN_TOKEN={}\nCOFFER_PYTHON={}\n{ca_env}",
            p.project,
            p.token,
            p.admin_token,
            tools.python.display()
        ),
    )?;
    println!(
        r#"
Coffer is up (MariaDB {label}; logs and data in {dir}).

  set -a; . {dir}/demo.env; set +a
  curl -s -H "X-Auth-Token: $COFFER_TOKEN" $COFFER_ENDPOINT/flavors
  curl -s -H "X-Auth-Token: $COFFER_TOKEN" -H 'Content-Type: application/json' $COFFER_ENDPOINT/instances \
    -d '{{"instance": {{"name": "db1", "flavorRef": "1", "volume": {{"size": 1}},
         "databases": [{{"name": "shop"}}], "users": [{{"name": "app", "password": "change-me", "databases": [{{"name": "shop"}}]}}]}}}}'
  curl -s -H "X-Auth-Token: $COFFER_TOKEN" $COFFER_ENDPOINT/instances      # wait for ACTIVE, then use ip + port
  mariadb -h 127.0.0.1 -P <port> -u app -p shop

python-troveclient (no Keystone; the token_endpoint plugin):
  $COFFER_PYTHON -c 'import os; from keystoneauth1 import session; from keystoneauth1.token_endpoint import Token
from troveclient.v1 import client
c = client.Client(session=session.Session(auth=Token(os.environ["COFFER_ENDPOINT"], os.environ["COFFER_TOKEN"])))
print([(i.name, i.status) for i in c.instances.list()])'

{tls_note}Ctrl-C stops the API, the databases (cleanly, through their agents), the agents, the controller and nats-server.
"#,
        dir = dir.display(),
        tls_note = if tls {
            "TLS is on (NATS and the API): give curl --cacert $COFFER_CA_FILE; python picks the CA up from REQUESTS_CA_BUNDLE.\n\n"
        } else {
            ""
        }
    );

    let sig = sigs.wait()?;
    eprintln!("xtask: {sig:?} received; stopping Coffer");
    // The controller stops serving, asks every agent to stop its database and exit, then exits.
    stop(
        &mut controller,
        "coffer-controller (API, databases, agents)",
        Duration::from_secs(180),
    );
    stop(&mut nats, "nats-server", Duration::from_secs(30));
    stop_pg(&mut pg);
    Ok(())
}

/// The store's PostgreSQL for `--store postgres`: initialised once in DIR/pgstore (the `coffer`
/// role's password in DIR/store.password, 0600), run as the `postgres` user when the demo runs as
/// root (the server refuses root), on a port kept in DIR/pgstore.port.
fn start_pg_store(dir: &Path) -> anyhow::Result<(Child, u16)> {
    let (_, pg_bin) =
        env::postgresql().context("PostgreSQL is not installed (apt-get install postgresql)")?;
    let bin = |name: &str| pg_bin.join(name);
    let owner = if nix::unistd::geteuid().is_root() {
        let u = nix::unistd::User::from_name("postgres")?
            .context("the postgres user is missing (it comes with Debian's postgresql package)")?;
        Some((u.uid, u.gid))
    } else {
        None
    };
    let as_owner = |mut c: Command| {
        if let Some((uid, gid)) = owner {
            std::os::unix::process::CommandExt::uid(&mut c, uid.as_raw());
            std::os::unix::process::CommandExt::gid(&mut c, gid.as_raw());
        }
        c
    };
    let home = dir.join("pgstore");
    let data = home.join("data");
    let port_file = home.join("port");
    let password_file = dir.join("store.password");
    if !data.exists() {
        env::step("initialising the store's PostgreSQL (--store postgres)");
        std::fs::create_dir_all(&home)?;
        let password = random_hex(24)?;
        write_private(&password_file, &password)?;
        let pwfile = home.join("initial.pw");
        write_private(&pwfile, &password)?;
        if let Some((uid, gid)) = owner {
            for p in [&home, &pwfile] {
                nix::unistd::chown(p.as_path(), Some(uid), Some(gid))?;
            }
        }
        let out = as_owner(Command::new(bin("initdb")))
            .args(["-U", "coffer", "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data)
            .output()?;
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            bail!(
                "initdb for the store failed (it runs as the postgres user, which must reach {}; \
                 use a --dir it can reach): {}",
                home.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        write_private(&port_file, &free_port()?.to_string())?;
    }
    let port: u16 = std::fs::read_to_string(&port_file)
        .with_context(|| format!("reading {}", port_file.display()))?
        .trim()
        .parse()?;
    let mut cmd = as_owner(Command::new(bin("postgres")));
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&home)
        .args(["-c", "listen_addresses=127.0.0.1"]);
    let log = dir.join("pgstore.log");
    let mut child = spawn_logged(cmd, &log)?;
    wait_port(port, "the store's PostgreSQL", &mut child, &log)?;
    let password = std::fs::read_to_string(&password_file)?;
    let psql = |sql: &str| -> anyhow::Result<String> {
        let out = Command::new(bin("psql"))
            .env("PGPASSWORD", password.trim())
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "coffer"])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // The port opens a moment before logins are accepted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exists = loop {
        match psql("SELECT 1 FROM pg_database WHERE datname = 'coffer'") {
            Ok(v) => break v == "1",
            Err(e) if Instant::now() > deadline => {
                stop(
                    &mut child,
                    "the store's PostgreSQL",
                    Duration::from_secs(10),
                );
                return Err(e);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    if !exists {
        psql("CREATE DATABASE coffer")?;
    }
    Ok((child, port))
}
