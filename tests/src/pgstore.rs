//! A PostgreSQL server for the controller's own store (the configuration several controllers
//! share): Debian's `postgresql` binaries, started on a free port under its own temp dir with
//! password authentication, run as `nobody` when the tests run as root (the server refuses root),
//! and stopped when dropped.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The user the store's server runs as, when the tests run as root.
const NOBODY: (u32, u32) = (65534, 65534);

/// The newest PostgreSQL major version installed under `/usr/lib/postgresql`.
pub fn pg_major() -> u32 {
    std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (cargo xtask test installs it)")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("no PostgreSQL version under /usr/lib/postgresql")
}

/// One of its binaries.
pub fn pg_bin(name: &str) -> PathBuf {
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin/{name}", pg_major()))
}

pub struct PgStore {
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PgStore {
    /// Initialises and starts a server; the superuser is `coffer` with a random password.
    pub fn start() -> PgStore {
        let dir = tempfile::Builder::new()
            .prefix("coffer-pgstore")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let password = crate::random_key_hex();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password).unwrap();
        if nix::unistd::geteuid().is_root() {
            for p in [dir.path(), &pwfile] {
                nix::unistd::chown(p, Some(NOBODY.0.into()), Some(NOBODY.1.into())).unwrap();
            }
        }
        let out = as_owner(Command::new(pg_bin("initdb")))
            .args(["-N", "-U", "coffer", "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(dir.path().join("data"))
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&pwfile);
        let mut s = PgStore {
            port: crate::alloc_ports(1)[0],
            password,
            dir,
            child: None,
        };
        s.resume();
        s
    }

    /// `postgres://coffer:PASSWORD@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://coffer:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// The URL without its password (for a controller given a `password_file`).
    pub fn url_without_password(&self, db: &str) -> String {
        format!("postgres://coffer@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` (empty).
    pub fn create_db(&self, db: &str) {
        let out = Command::new(pg_bin("psql"))
            .env("PGPASSWORD", &self.password)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "coffer",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!("CREATE DATABASE \"{db}\""))
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "creating database {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = as_owner(Command::new(pg_bin("postgres")))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        crate::wait_tcp(self.port, Duration::from_secs(30));
        // The port opens before the server accepts logins: wait until one succeeds.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store's PostgreSQL did not start; see {}",
                self.dir.path().join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (fast shutdown: open transactions roll back).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let _ = c.wait();
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cmd` run as the data directory's owner (`nobody` when the tests run as root).
fn as_owner(mut cmd: Command) -> Command {
    if nix::unistd::geteuid().is_root() {
        cmd.uid(NOBODY.0).gid(NOBODY.1);
        cmd.env("HOME", "/nonexistent");
    }
    cmd
}
