//! A two-host network lab on one machine: two network namespaces, `PREFIX-host-a` and
//! `PREFIX-host-b`, joined by a veth pair, so that a primary and its standby each have
//! an address of their own and the link between them can be cut
//! (`ip link set DEV down`). Used by `mirrorvm demo` and by tests.
//!
//! It drives the `ip` command (iproute2) and needs root. [`NetLab::create`] says why
//! when it cannot build the lab, so a caller can fall back to loopback. Dropping the
//! lab deletes both namespaces, and with them the veth pair; [`NetLab::cleanup_stale`]
//! removes what a killed earlier run left behind.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The default address of host a (`10.77.0.1/24`).
pub const DEFAULT_ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The default address of host b (`10.77.0.2/24`).
pub const DEFAULT_ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The prefix length of the lab's subnet.
pub const PREFIX_LEN: u8 = 24;
/// The veth device inside host a's namespace.
pub const DEV_A: &str = "veth-a";
/// The veth device inside host b's namespace.
pub const DEV_B: &str = "veth-b";
/// Where `ip netns` keeps a handle (a bind mount) of each named namespace.
pub const NETNS_DIR: &str = "/run/netns";

/// One of the lab's two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Host a (`PREFIX-host-a`): the primary in the demo; its side of the link is the
    /// one [`NetLab::link_down`] cuts.
    A,
    /// Host b (`PREFIX-host-b`): the standby in the demo.
    B,
}

impl Host {
    /// `"host-a"` or `"host-b"`.
    pub fn name(self) -> &'static str {
        match self {
            Host::A => "host-a",
            Host::B => "host-b",
        }
    }

    fn index(self) -> usize {
        match self {
            Host::A => 0,
            Host::B => 1,
        }
    }
}

/// Why the lab could not be built or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetLabError {
    /// Network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
    #[error("network namespaces need root, and mirrorvm runs as uid {euid}")]
    NotRoot {
        /// The effective user id.
        euid: u32,
    },
    /// The `ip` command is not installed (or not on PATH, /usr/sbin or /sbin).
    #[error("the `ip` command (iproute2) is not installed")]
    IpMissing,
    /// The prefix would give namespace names `ip netns` refuses.
    #[error("bad network lab prefix {prefix:?}: {why}")]
    BadPrefix {
        /// The prefix given.
        prefix: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A namespace of that name exists already: another lab with the same prefix is
    /// running, or a killed run left it (see [`NetLab::cleanup_stale`]).
    #[error("network namespace {name} exists already (another lab with this prefix, or a leftover: remove it with `ip netns del {name}`)")]
    Exists {
        /// The namespace's name.
        name: String,
    },
    /// `ip` could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The error of spawning it.
        #[source]
        source: std::io::Error,
    },
    /// `ip` ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

/// Two network namespaces joined by a veth pair. Dropping it deletes both.
#[derive(Debug)]
pub struct NetLab {
    ip: PathBuf,
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
    /// The namespaces this value created and must delete (a partly built lab deletes
    /// what it made).
    created: Vec<String>,
}

impl NetLab {
    /// Builds the lab with the default addresses (`10.77.0.1/24` on host a,
    /// `10.77.0.2/24` on host b). The subnet lives only inside the lab's own
    /// namespaces, so concurrent labs may all use it.
    pub fn create(prefix: &str) -> Result<NetLab, NetLabError> {
        Self::create_with(prefix, DEFAULT_ADDR_A, DEFAULT_ADDR_B)
    }

    /// Builds the lab with the given addresses (both in one /24): namespaces
    /// `PREFIX-host-a` and `PREFIX-host-b`, loopback up in each, a veth pair
    /// ([`DEV_A`] in a, [`DEV_B`] in b) with the addresses, links up.
    pub fn create_with(
        prefix: &str,
        addr_a: Ipv4Addr,
        addr_b: Ipv4Addr,
    ) -> Result<NetLab, NetLabError> {
        let names = Self::namespace_names(prefix)?;
        if !nix::unistd::geteuid().is_root() {
            return Err(NetLabError::NotRoot {
                euid: nix::unistd::geteuid().as_raw(),
            });
        }
        let ip = find_ip().ok_or(NetLabError::IpMissing)?;
        let existing = list_namespaces(&ip)?;
        if let Some(name) = names.iter().find(|n| existing.contains(n)) {
            return Err(NetLabError::Exists { name: name.clone() });
        }
        let mut lab = NetLab {
            ip,
            names,
            addrs: [addr_a, addr_b],
            created: Vec::new(),
        };
        // From here on every early return drops `lab`, which deletes what was made.
        for name in lab.names.clone() {
            run_ip(&lab.ip, &["netns", "add", &name])?;
            lab.created.push(name);
        }
        let [a, b] = lab.names.clone();
        // Created straight inside the namespaces: the names never meet in the root
        // namespace, so concurrent labs cannot collide.
        run_ip(
            &lab.ip,
            &[
                "-n", &a, "link", "add", DEV_A, "type", "veth", "peer", "name", DEV_B, "netns", &b,
            ],
        )?;
        for (ns, dev, addr) in [(&a, DEV_A, addr_a), (&b, DEV_B, addr_b)] {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            run_ip(&lab.ip, &["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            run_ip(&lab.ip, &["-n", ns, "link", "set", "lo", "up"])?;
            run_ip(&lab.ip, &["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(lab)
    }

    /// The namespace names a lab with `prefix` uses: `PREFIX-host-a`, `PREFIX-host-b`.
    pub fn namespace_names(prefix: &str) -> Result<[String; 2], NetLabError> {
        let bad = |why| NetLabError::BadPrefix {
            prefix: prefix.to_owned(),
            why,
        };
        if prefix.is_empty() {
            return Err(bad("it is empty"));
        }
        if prefix.len() > 200 {
            return Err(bad("it is longer than 200 bytes"));
        }
        if !prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        {
            return Err(bad(
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ));
        }
        Ok([
            format!("{prefix}-{}", Host::A.name()),
            format!("{prefix}-{}", Host::B.name()),
        ])
    }

    /// The name of `host`'s network namespace.
    pub fn namespace(&self, host: Host) -> &str {
        &self.names[host.index()]
    }

    /// The handle of `host`'s namespace (`/run/netns/NAME`), which `setns(2)` takes.
    pub fn netns_path(&self, host: Host) -> PathBuf {
        Path::new(NETNS_DIR).join(self.namespace(host))
    }

    /// Host a's address.
    pub fn addr_a(&self) -> Ipv4Addr {
        self.addrs[0]
    }

    /// Host b's address.
    pub fn addr_b(&self) -> Ipv4Addr {
        self.addrs[1]
    }

    /// `host`'s address.
    pub fn addr(&self, host: Host) -> Ipv4Addr {
        self.addrs[host.index()]
    }

    /// A command that runs `program` inside `host`'s namespace
    /// (`ip netns exec NAME program`); add its arguments to it. `ip` execs the
    /// program in its own process, so the child's pid is the program's.
    pub fn command_in(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", self.namespace(host)]).arg(program);
        c
    }

    /// Cuts the link: host a's end of the veth pair goes down. Packets between the
    /// hosts are then dropped silently; open connections see silence, not an error.
    pub fn link_down(&self) -> Result<(), NetLabError> {
        self.set_link("down")
    }

    /// Restores the link cut by [`NetLab::link_down`].
    pub fn link_up(&self) -> Result<(), NetLabError> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<(), NetLabError> {
        run_ip(
            &self.ip,
            &["-n", self.namespace(Host::A), "link", "set", DEV_A, state],
        )
        .map(drop)
    }

    /// Deletes the namespaces of a lab with `prefix` that an earlier run left (one
    /// killed before it could drop its lab). Returns the names it deleted. Do not call
    /// it while another process may be using a lab with the same prefix.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, NetLabError> {
        let names = Self::namespace_names(prefix)?;
        let ip = find_ip().ok_or(NetLabError::IpMissing)?;
        let existing = list_namespaces(&ip)?;
        let mut deleted = Vec::new();
        for name in names {
            if existing.contains(&name) {
                run_ip(&ip, &["netns", "del", &name])?;
                deleted.push(name);
            }
        }
        Ok(deleted)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace also destroys the veth end inside it, and so the pair.
        for name in self.created.drain(..).rev() {
            if let Err(e) = run_ip(&self.ip, &["netns", "del", &name]) {
                tracing::warn!("cannot delete network namespace {name}: {e}");
            }
        }
    }
}

/// The `ip` program: on PATH, else in /usr/sbin or /sbin (which a root shell's PATH
/// sometimes lacks).
fn find_ip() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join("ip"))
        .find(|p| p.is_file())
}

/// The names of the named network namespaces (`ip netns list`).
fn list_namespaces(ip: &Path) -> Result<Vec<String>, NetLabError> {
    let out = run_ip(ip, &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Runs `ip ARGS…`; its stdout on success.
fn run_ip(ip: &Path, args: &[&str]) -> Result<String, NetLabError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetLabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetLabError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// A prefix no other lab of this or a parallel test process uses.
    fn unique_prefix() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "mvt{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The lab, or `None` after a loud SKIPPED line when this host cannot build one
    /// (not root, no `ip`).
    fn lab_or_skip(test: &str) -> Option<NetLab> {
        match NetLab::create(&unique_prefix()) {
            Ok(lab) => Some(lab),
            Err(e @ (NetLabError::NotRoot { .. } | NetLabError::IpMissing)) => {
                // Straight to stderr: the harness does not capture it.
                let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {test}: {e} ***\n");
                None
            }
            Err(e) => panic!("cannot build the lab: {e}"),
        }
    }

    fn namespaces() -> Vec<String> {
        list_namespaces(&find_ip().expect("ip")).expect("ip netns list")
    }

    /// Runs `f` on a thread that has entered `host`'s namespace.
    fn in_ns<T: Send + 'static>(
        lab: &NetLab,
        host: Host,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = lab.netns_path(host);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace handle");
            // A thread may switch its own network namespace; sockets it makes then
            // belong to that namespace.
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    fn connect_from_b(lab: &NetLab, to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
        in_ns(lab, Host::B, move || {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            assert_eq!(&buf, b"ping", "echo through the lab");
            Ok(())
        })
        .join()
        .expect("client thread")
    }

    #[test]
    fn hosts_have_their_addresses_and_talk_over_the_link_until_it_is_cut() {
        let Some(lab) = lab_or_skip(
            "netlab::hosts_have_their_addresses_and_talk_over_the_link_until_it_is_cut",
        ) else {
            return;
        };
        // Each namespace holds its own address and not the other's.
        for (host, mine, other) in [
            (Host::A, lab.addr_a(), lab.addr_b()),
            (Host::B, lab.addr_b(), lab.addr_a()),
        ] {
            let out = lab
                .command_in(host, "ip")
                .args(["-4", "-o", "addr", "show"])
                .output()
                .expect("ip netns exec");
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("{mine}/24")), "{host:?}: {text}");
            assert!(!text.contains(&format!("{other}/")), "{host:?}: {text}");
            assert!(
                text.contains("127.0.0.1/8"),
                "loopback up in {host:?}: {text}"
            );
        }

        // An echo server in a, reached from b.
        let listener = in_ns(&lab, Host::A, {
            let addr = SocketAddr::from((lab.addr_a(), 0));
            move || TcpListener::bind(addr).expect("bind in a")
        })
        .join()
        .expect("bind thread");
        let server = listener.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        connect_from_b(&lab, server, Duration::from_secs(5)).expect("echo from b to a");

        lab.link_down().expect("link down");
        let t = Instant::now();
        let cut = connect_from_b(&lab, server, Duration::from_millis(500));
        assert!(cut.is_err(), "a connection crossed a cut link");
        assert!(t.elapsed() < Duration::from_secs(5));

        lab.link_up().expect("link up");
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match connect_from_b(&lab, server, Duration::from_millis(500)) {
                Ok(()) => break,
                Err(e) if Instant::now() > end => panic!("link up did not restore it: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    #[test]
    fn drop_deletes_both_namespaces() {
        let Some(lab) = lab_or_skip("netlab::drop_deletes_both_namespaces") else {
            return;
        };
        let names = [
            lab.namespace(Host::A).to_owned(),
            lab.namespace(Host::B).to_owned(),
        ];
        let before = namespaces();
        assert!(names.iter().all(|n| before.contains(n)), "{before:?}");
        drop(lab);
        let after = namespaces();
        assert!(names.iter().all(|n| !after.contains(n)), "{after:?}");
    }

    #[test]
    fn a_second_lab_with_the_same_prefix_is_refused_and_cleanup_stale_removes_leftovers() {
        let Some(lab) = lab_or_skip(
            "netlab::a_second_lab_with_the_same_prefix_is_refused_and_cleanup_stale_removes_leftovers",
        ) else {
            return;
        };
        let prefix = lab
            .namespace(Host::A)
            .strip_suffix("-host-a")
            .expect("suffix")
            .to_owned();
        match NetLab::create(&prefix) {
            Err(NetLabError::Exists { name }) => assert_eq!(name, lab.namespace(Host::A)),
            other => panic!("expected Exists, got {other:?}"),
        }
        // A run killed before its drop leaves both namespaces behind.
        std::mem::forget(lab);
        let mut deleted = NetLab::cleanup_stale(&prefix).expect("cleanup");
        deleted.sort();
        assert_eq!(
            deleted,
            vec![format!("{prefix}-host-a"), format!("{prefix}-host-b")]
        );
        let after = namespaces();
        assert!(!after.iter().any(|n| n.starts_with(&prefix)), "{after:?}");
        assert!(NetLab::cleanup_stale(&prefix).expect("again").is_empty());
        // And the prefix can be used again.
        drop(NetLab::create(&prefix).expect("a lab on the cleaned prefix"));
    }

    #[test]
    fn bad_prefixes_are_refused_before_anything_runs() {
        for p in ["", "a b", "x/y", "ä"] {
            assert!(
                matches!(
                    NetLab::namespace_names(p),
                    Err(NetLabError::BadPrefix { .. })
                ),
                "{p:?}"
            );
        }
        assert_eq!(
            NetLab::namespace_names("mvdemo").expect("good"),
            ["mvdemo-host-a".to_owned(), "mvdemo-host-b".to_owned()]
        );
    }
}
