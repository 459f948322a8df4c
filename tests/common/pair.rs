//! A primary and its standby on this host (loopback): spawn both, wait for the
//! mirror, kill or stop either, read both consoles and both stderrs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{make_image, mirrorvm, tempdir, Running};

/// How to start a pair.
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// Guest command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory (`--memory`).
    pub memory: String,
    /// Disk size in bytes (0: no disk).
    pub disk: u64,
    /// Fill the primary's disk with non-zero bytes (the initial copy skips zeros).
    pub disk_filled: bool,
    /// More `--disk` options for the primary's disk (e.g. `,region-size=2M`).
    pub primary_disk_opts: String,
    /// More `--disk` options for the standby's disk.
    pub standby_disk_opts: String,
    /// Use a witness file.
    pub witness: bool,
    /// More options for the primary.
    pub primary_args: Vec<String>,
    /// More options for the standby.
    pub standby_args: Vec<String>,
    /// A Linux kernel to boot instead of the test guest; the primary's disk is then
    /// an ext4 root file system.
    pub kernel: Option<PathBuf>,
    /// The standby's listening address (default: a free loopback port).
    pub listen: Option<String>,
    /// The address the primary dials (default: the standby's; a proxy's otherwise).
    pub peer: Option<String>,
    /// Network namespaces to run the primary and the standby in.
    pub netns: Option<(String, String)>,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            cmdline: "counter".into(),
            cpus: 1,
            memory: "64M".into(),
            disk: 0,
            disk_filled: false,
            primary_disk_opts: String::new(),
            standby_disk_opts: String::new(),
            witness: false,
            primary_args: Vec::new(),
            standby_args: Vec::new(),
            kernel: None,
            listen: None,
            peer: None,
            netns: None,
        }
    }
}

/// A running pair.
pub struct Pair {
    /// Keeps the files.
    pub dir: tempfile::TempDir,
    /// The standby.
    pub standby: Option<Running>,
    /// The primary.
    pub primary: Option<Running>,
    /// The standby's address.
    pub addr: String,
    /// The address the primary dials.
    pub peer: String,
}

/// The mirrorvm binary, run inside network namespace `ns` if one is given.
fn command_in(ns: Option<&str>) -> std::process::Command {
    match ns {
        None => mirrorvm(),
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_mirrorvm")])
                .stdin(std::process::Stdio::null());
            c
        }
    }
}

/// A free TCP port on loopback (bound and released: a tiny race, fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Pair {
    /// The file `name` in the pair's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the standby, then the primary.
    pub fn start(o: &PairOpts) -> Pair {
        let dir = tempdir();
        let addr = o
            .listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let peer = o.peer.clone().unwrap_or_else(|| addr.clone());
        let mut pair = Pair {
            dir,
            standby: None,
            primary: None,
            addr,
            peer,
        };
        if o.disk > 0 {
            if o.kernel.is_some() {
                super::make_ext4(&pair.path("a.img"), o.disk);
            } else {
                make_image(&pair.path("a.img"), o.disk);
                if o.disk_filled {
                    let fill: Vec<u8> = (0..o.disk).map(|i| (i % 251) as u8 | 1).collect();
                    std::fs::write(pair.path("a.img"), fill).expect("fill the primary's disk");
                }
            }
            make_image(&pair.path("b.img"), o.disk);
        }
        pair.standby = Some(Running::spawn(pair.standby_command(o)));
        pair.primary = Some(Running::spawn(pair.primary_command(o)));
        pair
    }

    /// The standby's command line.
    pub fn standby_command(&self, o: &PairOpts) -> std::process::Command {
        let mut s = command_in(o.netns.as_ref().map(|n| n.1.as_str()));
        s.args(["standby", "--listen", &self.addr])
            .arg("--serial")
            .arg(format!("file={}", self.path("b.txt").display()))
            .arg("--metrics")
            .arg(self.path("b.jsonl"));
        if o.disk > 0 {
            s.arg("--disk").arg(format!(
                "path={},checkpoint=on{}",
                self.path("b.img").display(),
                o.standby_disk_opts
            ));
        }
        if o.witness {
            s.arg("--witness").arg(self.path("witness"));
        }
        s.args(&o.standby_args);
        s
    }

    /// The primary's command line.
    pub fn primary_command(&self, o: &PairOpts) -> std::process::Command {
        let mut p = command_in(o.netns.as_ref().map(|n| n.0.as_str()));
        p.args(["run", "--memory", &o.memory, "--cpus", &o.cpus.to_string()])
            .args(["--cmdline", &o.cmdline, "--peer", &self.peer])
            .arg("--serial")
            .arg(format!("file={}", self.path("a.txt").display()))
            .arg("--metrics")
            .arg(self.path("a.jsonl"));
        if o.disk > 0 {
            p.arg("--disk").arg(format!(
                "path={},checkpoint=on{}",
                self.path("a.img").display(),
                o.primary_disk_opts
            ));
        }
        if o.witness {
            p.arg("--witness").arg(self.path("witness"));
        }
        if let Some(k) = &o.kernel {
            p.arg("--kernel").arg(k);
        }
        p.args(&o.primary_args);
        p
    }

    /// Ends both (SIGKILL) and returns their stderrs, for a failure message.
    pub fn dump(&mut self) -> String {
        let p = self.kill_primary();
        let s = self.kill_standby();
        format!(
            "primary stderr:\n{p}\nstandby stderr:\n{s}\nprimary console:\n{}",
            self.primary_console()
        )
    }

    /// Waits until the standby applied `n` checkpoints, or ends both and panics with
    /// their stderrs.
    pub fn expect_applied(&mut self, n: usize, timeout: Duration) {
        if !self.wait_applied(n, timeout) {
            let d = self.dump();
            panic!("the standby did not apply {n} checkpoints within {timeout:?}:\n{d}");
        }
    }

    /// Checkpoints the standby has applied so far.
    pub fn applied(&self) -> usize {
        lines(&self.path("b.jsonl"))
    }

    /// Waits until the standby applied `n` checkpoints.
    pub fn wait_applied(&self, n: usize, timeout: Duration) -> bool {
        wait(timeout, || self.applied() >= n)
    }

    /// The primary's console so far.
    pub fn primary_console(&self) -> String {
        std::fs::read_to_string(self.path("a.txt")).unwrap_or_default()
    }

    /// The standby's console so far (empty until it takes over).
    pub fn standby_console(&self) -> String {
        std::fs::read_to_string(self.path("b.txt")).unwrap_or_default()
    }

    /// Kills the primary with SIGKILL.
    pub fn kill_primary(&mut self) -> String {
        self.primary.take().map(Running::stderr).unwrap_or_default()
    }

    /// Kills the standby with SIGKILL; returns its stderr.
    pub fn kill_standby(&mut self) -> String {
        self.standby.take().map(Running::stderr).unwrap_or_default()
    }

    /// Waits for the standby to exit by itself; its status and stderr.
    pub fn standby_exit(
        &mut self,
        timeout: Duration,
    ) -> (Option<std::process::ExitStatus>, String) {
        let Some(mut s) = self.standby.take() else {
            return (None, String::new());
        };
        let status = s.wait_exit(timeout);
        (status, s.stderr())
    }

    /// Waits for the primary to exit by itself; its status and stderr.
    pub fn primary_exit(
        &mut self,
        timeout: Duration,
    ) -> (Option<std::process::ExitStatus>, String) {
        let Some(mut p) = self.primary.take() else {
            return (None, String::new());
        };
        let status = p.wait_exit(timeout);
        (status, p.stderr())
    }
}

/// Lines in a file (0 if it does not exist).
pub fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test guest's progress seconds per engine (`mix: memory: S s`, `mix: disk: S s`),
/// from a console transcript.
pub fn mix_seconds(console: &str, engine: &str) -> Vec<u64> {
    let prefix = format!("mix: {engine}: ");
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect()
}

/// Lost and repeated values when `before` (shown by the primary) is followed by
/// `after` (shown by the standby): a sequence must go on by one each step.
pub fn continuity(before: &[u64], after: &[u64]) -> (u64, u64) {
    let all: Vec<u64> = before.iter().chain(after).copied().collect();
    let mut lost = 0;
    let mut repeated = 0;
    for w in all.windows(2) {
        if w[1] <= w[0] {
            repeated += w[0] - w[1] + 1;
        } else {
            lost += w[1] - w[0] - 1;
        }
    }
    (lost, repeated)
}
