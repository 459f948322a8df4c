//! What a user asks for: the machine's configuration, and the parsers for the
//! cloud-hypervisor-style option values (`256M`, `path=FILE,readonly=on`,
//! `tty|file=PATH|off`). The command line in `src/` only maps flags onto this.

use std::path::PathBuf;
use std::str::FromStr;

/// Bad option values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size could not be parsed.
    #[error(
        "invalid size '{0}': expected a number with an optional K, M, G or T suffix, or KiB, MiB, GiB, TiB (e.g. 256M, 64MiB)"
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

/// Parses a size such as `256M`, `1G`, `4096` (bytes), `512K` or `64MiB`: binary
/// units, case-insensitive, `KiB` the same as `K`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    // `KiB` is `K`: drop the `iB` after a unit letter.
    let t = match t.len().checked_sub(3) {
        Some(i)
            if t.is_char_boundary(i)
                && t.as_bytes()[i].is_ascii_alphabetic()
                && t[i + 1..].eq_ignore_ascii_case("ib") =>
        {
            &t[..=i]
        }
        _ => t,
    };
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
    /// `region-size=`: bytes each checkpoint region of a new journal holds (checked
    /// against `devices::store::sizing`). `None`: the default rule for a new journal,
    /// the journal's own size for an existing one. Absent from manifests written
    /// before it existed.
    #[serde(default)]
    pub region_size: Option<u64>,
}

impl DiskConfig {
    /// A disk at `path` with every option at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            checkpoint: false,
            region_size: None,
        }
    }
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
        let mut region_size = None;
        let disk_err = |reason: String| ConfigError::Disk {
            value: value.to_string(),
            reason,
        };
        for item in value.split(',') {
            let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Disk {
                value: value.to_string(),
                reason: format!("'{item}' is not key=value"),
            })?;
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "readonly" => readonly = parse_on_off(k, v, value)?,
                "checkpoint" => checkpoint = parse_on_off(k, v, value)?,
                "region-size" => {
                    let bytes = parse_size(v).map_err(|e| disk_err(e.to_string()))?;
                    let bytes = devices::store::sizing::check_region_size(bytes)
                        .map_err(|e| disk_err(e.to_string()))?;
                    region_size = Some(bytes);
                }
                _ => {
                    return Err(disk_err(format!(
                        "unknown or empty option '{k}' (known: path, readonly, checkpoint, region-size)"
                    )))
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
        if region_size.is_some() && readonly {
            return Err(disk_err(
                "region-size sizes the checkpoint journal of a writable disk: a read-only disk has none".into(),
            ));
        }
        Ok(DiskConfig {
            path,
            readonly,
            checkpoint,
            region_size,
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
    Directory(DirectoryConfig),
    /// A standby host (`--peer`): `docs/protocol.md`.
    Peer(crate::replication::peer::PeerConfig),
    /// No standby yet: run unprotected until one dials in on `listen` of this
    /// configuration (`run --listen` without `--peer`, or a standby that took over).
    Await(crate::replication::peer::PeerConfig),
}

/// A checkpoint directory, how pages are stored in it and when its chain is folded
/// (`--checkpoint-dir DIR[,compress=lz4|none][,fold=small|large]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// The directory.
    pub path: PathBuf,
    /// How pages that are not all zeros are stored (zero pages are always a bit).
    pub compression: crate::checkpoint::pagecodec::Compression,
    /// When the chain of checkpoint files is folded into the memory image.
    pub fold: crate::checkpoint::directory::Fold,
}

/// Epoch settings: how often to cut, where checkpoints go, where metrics go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochConfig {
    /// Epoch length: fixed, or chosen by the engine (`--epoch-ms auto`).
    pub epoch: crate::epoch::EpochLength,
    /// Where checkpoints go.
    pub sink: SinkConfig,
    /// Per-epoch metrics as JSON lines.
    pub metrics: Option<PathBuf>,
    /// Serve the same figures for Prometheus at `http://ADDR/metrics`.
    pub metrics_addr: Option<String>,
}

/// The epoch length when none is given (`--epoch-ms`), and a new primary's after a
/// takeover.
pub const DEFAULT_EPOCH: std::time::Duration = std::time::Duration::from_millis(25);

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
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("64iB").is_err());
        assert!(parse_size("iB").is_err());
        assert!(parse_size("64 MiB").is_err());
        assert!(parse_size("64MB").is_err());
        assert!(parse_size("64Mi").is_err());
        assert!(parse_size("é").is_err());
    }

    #[test]
    fn region_sizes() {
        let rs = |v: &str| {
            format!("path=x,checkpoint=on,region-size={v}")
                .parse::<DiskConfig>()
                .map(|d| d.region_size)
        };
        assert_eq!(rs("4M"), Ok(Some(4 << 20)));
        assert_eq!(rs("64MiB"), Ok(Some(64 << 20)));
        assert_eq!(rs("1G"), Ok(Some(1 << 30)));
        assert_eq!(rs("2052K"), Ok(Some(2052 << 10)));
        assert_eq!(rs(&(3u64 << 20).to_string()), Ok(Some(3 << 20)));
        assert_eq!(
            "path=x,checkpoint=on"
                .parse::<DiskConfig>()
                .map(|d| d.region_size),
            Ok(None)
        );
        let err = |v: &str| rs(v).unwrap_err().to_string();
        let e = err("1M");
        assert!(
            e.starts_with("invalid --disk 'path=x,checkpoint=on,region-size=1M': region-size 1 MiB is below the minimum 2 MiB"),
            "{e}"
        );
        let e = err("2G");
        assert!(
            e.contains("region-size 2 GiB is above the maximum 1 GiB"),
            "{e}"
        );
        let e = err("3000001");
        assert!(e.contains("not a multiple of 4 KiB"), "{e}");
        let e = err("lots");
        assert!(e.contains("invalid size 'lots'"), "{e}");
        let e = err("");
        assert!(e.contains("invalid size ''"), "{e}");
        for e in [err("1M"), err("2G"), err("lots")] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = "path=x,readonly=on,region-size=4M"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("a read-only disk has none"), "{e}");
    }

    #[test]
    fn disks() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                readonly: true,
                ..DiskConfig::new("/tmp/a.img")
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
