//! The start-up fault probe (`vmm::fault_probe`) on this host's KVM: a probe VM
//! writes pages at CPL3 after they were write-protected through dirty logging; the
//! probe must see every write in the dirty log and find the protected pass slower.
//! Also: `mirrorvm run` with checkpoints logs what it measured, and
//! `MIRRORVM_FAULT_US` overrides it.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_probe_measures_a_fault_and_the_dirty_log_saw_every_page() {
    if skip_without_kvm!() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new_with_path(
        std::ffi::CString::new(kvm_device().into_os_string().into_encoded_bytes()).unwrap(),
    )
    .unwrap();
    let p = vmm::fault_probe::measure(&kvm).unwrap();
    eprintln!("fault probe: {p:?}");
    assert_eq!(p.pages, vmm::fault_probe::PROBE_PAGES);
    assert_eq!(p.logged, p.pages, "every page written was logged");
    assert!(
        p.protected_pass_ns > p.writable_pass_ns,
        "a pass over re-protected pages ({} ns) must be slower than over writable ones ({} ns)",
        p.protected_pass_ns,
        p.writable_pass_ns
    );
    assert!(p.fault_ns > 0);
    // Another size works too (and one page is enough to see a fault).
    let one = vmm::fault_probe::measure_with(&kvm, 1, 2).unwrap();
    assert_eq!((one.pages, one.logged), (1, 1));
}

/// The probe runs when a checkpointed run starts and its figure reaches the policy;
/// `MIRRORVM_FAULT_US` replaces it.
#[test]
fn a_checkpointed_run_uses_the_probe_unless_overridden() {
    if skip_without_kvm!() {
        return;
    }
    let policy_line = |fault_us: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = mirrorvm();
        c.args([
            "run",
            "--cmdline",
            "counter interval_ms=10 limit=2",
            "--epoch-ms",
            "25",
        ])
        .arg("--checkpoint-dir")
        .arg(dir.path().join("ck"))
        .env("MIRRORVM_LOG", "info");
        if let Some(v) = fault_us {
            c.env("MIRRORVM_FAULT_US", v);
        }
        let out = run_with_timeout(c, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "mirrorvm failed: {err}");
        err.lines()
            .find(|l| l.contains("dirty tracking:"))
            .unwrap_or_else(|| panic!("no dirty-tracking line in: {err}"))
            .to_string()
    };
    let probed = policy_line(None);
    assert!(
        probed.contains("(measured by the start-up probe"),
        "{probed}"
    );
    let set = policy_line(Some("37"));
    assert!(set.contains("fault 37000 ns (MIRRORVM_FAULT_US)"), "{set}");
}
