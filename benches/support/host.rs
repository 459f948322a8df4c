//! The host a benchmark ran on, for the header line of its table: CPU model, cores,
//! kernel, which KVM module (the software-nested `kvm_pvm` or not) and the load.
//! Included by benches with `#[path = "support/host.rs"] mod host;`.
#![allow(dead_code)]

/// One line: `host: CPU, N cores, Linux K, KVM: MODULE; load average L`.
pub fn line() -> String {
    format!(
        "host: {}, {} cores, Linux {}, kvm module: {}; load average {}",
        cpu_model(),
        cores(),
        kernel(),
        kvm_module(),
        load()
    )
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

/// The kernel release (`uname -r`).
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `kvm_pvm (software-nested)`, `kvm_amd`, `kvm_intel`, or `none loaded`.
pub fn kvm_module() -> String {
    let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if loaded("kvm_pvm") {
        "kvm_pvm (software-nested, not VT-x/SVM)".into()
    } else if loaded("kvm_amd") {
        "kvm_amd (hardware SVM, no kvm_pvm)".into()
    } else if loaded("kvm_intel") {
        "kvm_intel (hardware VT-x, no kvm_pvm)".into()
    } else {
        "none loaded".into()
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
