//! What a user asks for: the machine's configuration, and the parsers for the
//! cloud-hypervisor-style option values (`256M`, `path=FILE,readonly=on`,
//! `tty|file=PATH|off`). The command line in `src/` only maps flags onto this.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Bad option values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size could not be parsed.
    #[error(
        "invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 256M)"
    )]
    Size(String),
    /// A disk option list could not be parsed.
    #[error("invalid --disk '{value}': {reason}")]
    Disk {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A serial option could not be parsed.
    #[error("invalid --serial '{0}': expected tty, file=PATH or off")]
    Serial(String),
    /// The vCPU count is out of range.
    #[error("invalid --cpus {0}: expected 1 to {max}", max = crate::layout::MAX_VCPUS)]
    Cpus(u32),
}

/// Parses a size such as `256M`, `1G`, `4096` (bytes) or `512K`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        Some(_) => (t, 0),
        None => return Err(err()),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Which kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The test guest embedded in the binary.
    TestGuest,
    /// A kernel image file (ELF vmlinux or bzImage).
    File(PathBuf),
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse guest writes (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Guest writes go into checkpoint regions of a journal beside the image
    /// (`IMAGE.mvj`) and reach the image only when their checkpoint is retired.
    pub checkpoint: bool,
}

fn parse_on_off(key: &str, v: &str, value: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::Disk {
            value: value.to_string(),
            reason: format!("{key} must be on or off, not '{v}'"),
        }),
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut readonly = false;
        let mut checkpoint = false;
        for item in value.split(',') {
            let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Disk {
                value: value.to_string(),
                reason: format!("'{item}' is not key=value"),
            })?;
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "readonly" => readonly = parse_on_off(k, v, value)?,
                "checkpoint" => checkpoint = parse_on_off(k, v, value)?,
                _ => {
                    return Err(ConfigError::Disk {
                        value: value.to_string(),
                        reason: format!(
                            "unknown or empty option '{k}' (known: path, readonly, checkpoint)"
                        ),
                    })
                }
            }
        }
        let path = path.ok_or_else(|| ConfigError::Disk {
            value: value.to_string(),
            reason: "path=FILE is required".into(),
        })?;
        if readonly && checkpoint {
            return Err(ConfigError::Disk {
                value: value.to_string(),
                reason: "a read-only disk has no writes to checkpoint: use readonly=on or checkpoint=on, not both".into(),
            });
        }
        Ok(DiskConfig {
            path,
            readonly,
            checkpoint,
        })
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// This process's stdout, with stdin as input.
    #[default]
    Tty,
    /// A file (created or truncated); no input.
    File(PathBuf),
    /// Discarded.
    Off,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tty" => Ok(SerialConfig::Tty),
            "off" | "null" => Ok(SerialConfig::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// Where checkpoints go. Built into a sink at the one point where a configuration
/// becomes a machine (`machine::build`), so the run loop never chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// A local directory (`--checkpoint-dir`): `docs/checkpoint-format.md`.
    Directory(PathBuf),
    /// A standby host (`--peer`): `docs/protocol.md`.
    Peer(crate::replication::peer::PeerConfig),
}

/// Epoch settings: how often to cut, where checkpoints go, where metrics go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochConfig {
    /// Epoch length.
    pub epoch: Duration,
    /// Where checkpoints go.
    pub sink: SinkConfig,
    /// Per-epoch metrics as JSON lines.
    pub metrics: Option<PathBuf>,
    /// Serve the same figures for Prometheus at `http://ADDR/metrics`.
    pub metrics_addr: Option<String>,
}

/// The KVM device node used unless the configuration names another.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Command line of the test guest when none is given.
pub const DEFAULT_TESTGUEST_CMDLINE: &str = "hello";
/// Command line of a Linux kernel when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Everything needed to build a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// An initramfs to load beside it.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line; the virtio-mmio devices are appended to it.
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// virtio-blk disks, in order (the first is `vda`).
    pub disks: Vec<DiskConfig>,
    /// Serial console.
    pub serial: SerialConfig,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Checkpoint every epoch into a sink.
    pub epoch: Option<EpochConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: KernelSource::TestGuest,
            initramfs: None,
            cmdline: None,
            cpus: 1,
            memory: DEFAULT_MEMORY,
            disks: Vec::new(),
            serial: SerialConfig::Tty,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            epoch: None,
        }
    }
}

impl VmConfig {
    /// The command line before the devices are appended.
    pub fn base_cmdline(&self) -> &str {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c,
            (None, KernelSource::TestGuest) => DEFAULT_TESTGUEST_CMDLINE,
            (None, KernelSource::File(_)) => DEFAULT_LINUX_CMDLINE,
        }
    }

    /// Checks a vCPU count given as a plain number.
    pub fn cpus_from(n: u32) -> Result<u8, ConfigError> {
        match u8::try_from(n) {
            Ok(c) if (1..=crate::layout::MAX_VCPUS).contains(&c) => Ok(c),
            _ => Err(ConfigError::Cpus(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn disks() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/tmp/a.img".into(),
                readonly: true,
                checkpoint: false,
            }
        );
        assert!(
            "path=x,checkpoint=on"
                .parse::<DiskConfig>()
                .unwrap()
                .checkpoint
        );
        assert!("path=x,checkpoint=on,readonly=on"
            .parse::<DiskConfig>()
            .is_err());
        assert!(!"path=x".parse::<DiskConfig>().unwrap().readonly);
        assert!("readonly=on".parse::<DiskConfig>().is_err());
        assert!("path=x,readonly=maybe".parse::<DiskConfig>().is_err());
        assert!("path=x,colour=red".parse::<DiskConfig>().is_err());
        assert!("/tmp/a.img".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn serial() {
        assert_eq!("tty".parse(), Ok(SerialConfig::Tty));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("pty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(VmConfig::cpus_from(2), Ok(2));
        assert!(VmConfig::cpus_from(0).is_err());
        assert!(VmConfig::cpus_from(1000).is_err());
    }
}
