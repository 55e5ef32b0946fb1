//! A stand-in for `qemu-system-x86_64` in tests of the qemu provisioner on machines without
//! virtualization: it takes qemu's arguments as the provisioner passes them, reads the NoCloud
//! seed the provisioner wrote (`mcopy`), and "boots" the guest as the image would: the agent
//! with the seed's enrolment config, its database on the forwarded port, everything under the
//! VM's directory. `-daemonize` and `-pidfile` behave as qemu's; SIGTERM powers the "VM" off
//! (every process started from its directory ends), as a real VM's processes end with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn power_off(dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for _ in 0..50 {
        let left = coffer_tests::processes_mentioning(&dir.to_string_lossy());
        if left.is_empty() {
            return;
        }
        for p in left {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The running "VM": the agent as its guest, powered off on SIGTERM.
fn run_vm(dir: PathBuf, agent: PathBuf, config: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The guest's console: where the agent logs (the test kit shows it when a test fails).
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut child = tokio::process::Command::new(&agent)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = child.wait() => {}
        }
        power_off(&dir);
        anyhow::Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--vm") {
        return run_vm(
            PathBuf::from(&args[1]),
            PathBuf::from(&args[2]),
            PathBuf::from(&args[3]),
        );
    }
    let drives = arg_after(&args, "-drive");
    let file_of = |d: &str| {
        d.split(',')
            .find_map(|kv| kv.strip_prefix("file="))
            .map(PathBuf::from)
    };
    let seed = drives
        .iter()
        .filter_map(|d| file_of(d))
        .find(|f| f.ends_with("seed.img"))
        .ok_or_else(|| anyhow::anyhow!("no seed drive in {args:?}"))?;
    let dir = seed.parent().unwrap().to_path_buf();
    let netdev = arg_after(&args, "-netdev").join(",");
    let (addr, port) = netdev
        .split(',')
        .find_map(|kv| kv.strip_prefix("hostfwd=tcp:"))
        .and_then(|f| f.split_once("-:"))
        .and_then(|(host, _)| host.rsplit_once(':'))
        .map(|(a, p)| (a.to_string(), p.to_string()))
        .ok_or_else(|| anyhow::anyhow!("no hostfwd in {netdev}"))?;
    let pidfile = arg_after(&args, "-pidfile")
        .first()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("no -pidfile"))?;
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&seed)
        .args(["::user-data", "-"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user_data = String::from_utf8(out.stdout)?;
    let token = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("content: coffer-enrol-"))
        .map(|t| format!("coffer-enrol-{t}"))
        .ok_or_else(|| anyhow::anyhow!("no token in the seed"))?;
    let url = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("controller_url = "))
        .ok_or_else(|| anyhow::anyhow!("no controller_url in the seed"))?
        .trim_matches('"')
        .to_string();
    let token_file = dir.join("enrol-token");
    std::fs::write(&token_file, token)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nguest_log_file = {:?}\n[listen]\nbind_address = {addr:?}\nport = {port}\n\
             [enrol]\ncontroller_url = {url:?}\ntoken_file = {:?}\ninsecure = true\n",
            dir.join("state").display().to_string(),
            dir.join("guest.log").display().to_string(),
            token_file.display().to_string(),
        ),
    )?;
    let agent = std::env::current_exe()?
        .parent()
        .unwrap()
        .join("coffer-agent");
    // -daemonize: the "VM" runs on by itself; qemu's pid file names it.
    let mut vm = Command::new(std::env::current_exe()?);
    vm.arg("--vm")
        .arg(&dir)
        .arg(&agent)
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group: what ends the controller's group does not power the VM off.
    std::os::unix::process::CommandExt::process_group(&mut vm, 0);
    let child = vm.spawn()?;
    std::fs::write(&pidfile, child.id().to_string())?;
    Ok(())
}
