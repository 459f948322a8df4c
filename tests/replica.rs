//! A machine built from a checkpoint source whose memory is already in place: what a
//! standby does when it takes over. A checkpointed `counter` guest is killed with
//! SIGKILL; its directory is read into memory (as a standby's replica would be), and
//! `Machine::from_source` with a `ReplicaSource` continues the guest in this process,
//! using that very memory (same host mapping, no copy), from exactly the checkpoint.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vm_memory::GuestMemoryBackend;
use vmm::checkpoint::directory::DirectorySource;
use vmm::checkpoint::source::{CheckpointSource, ReplicaSource};
use vmm::config::SerialConfig;
use vmm::{Machine, RunEnd};

#[test]
fn a_replica_in_memory_resumes_in_place_where_its_checkpoint_was_cut() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let first = dir.path().join("first.txt");
    let mut c = mirrorvm();
    c.args([
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "counter",
        "--checkpoint-dir",
    ])
    .arg(&ck)
    .arg("--serial")
    .arg(format!("file={}", first.display()));
    let r = Running::spawn(c);
    assert!(
        wait_checkpoint(&ck, 3, Duration::from_secs(60)),
        "no third checkpoint"
    );
    r.kill9();
    let shown = counters(std::fs::read_to_string(&first).unwrap_or_default().lines());

    // The standby's replica: the manifest and memory at the latest checkpoint.
    let mut dir_source = DirectorySource::new(&ck);
    let manifest = dir_source.manifest().expect("manifest");
    let restored = dir_source.load().expect("load");
    let epoch = restored.epoch;
    let host_addr =
        |m: &vmm::memory::GuestMemory| m.iter().map(|r| r.as_ptr() as usize).collect::<Vec<_>>();
    let before = host_addr(&restored.memory);
    let mut replica = ReplicaSource::new(manifest, restored, "an in-memory replica");

    let second = dir.path().join("second.txt");
    let machine = Machine::from_source(
        &mut replica,
        &SerialConfig::File(second.clone()),
        &kvm_device(),
        None,
    )
    .expect("machine from the replica");
    assert_eq!(
        host_addr(machine.memory()),
        before,
        "the replica's memory was copied, not used in place"
    );
    // A replica hands its memory over once.
    assert!(replica.load().is_err());

    let stop = machine.shutdown_handle();
    let run = std::thread::spawn(move || machine.run());
    // Let the restored guest count on for a while, then stop it.
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end
        && counters(std::fs::read_to_string(&second).unwrap_or_default().lines()).len() < 5
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.request(RunEnd::Quit);
    let end = run.join().expect("run thread").expect("run");
    assert_eq!(end, RunEnd::Quit);
    let resumed = counters(std::fs::read_to_string(&second).unwrap_or_default().lines());
    assert!(
        resumed.len() >= 5,
        "the guest restored from checkpoint {epoch} did not count on: {resumed:?}"
    );
    // It continues the same count: nothing it showed before the kill is shown again
    // (output commit held what no checkpoint covered), and it goes on counting.
    let last_shown = shown.last().copied().unwrap_or(0);
    assert!(
        resumed[0] > last_shown,
        "resumed at {} but {last_shown} was already shown before the kill",
        resumed[0]
    );
    assert!(
        resumed.windows(2).all(|w| w[1] == w[0] + 1),
        "the count skipped or repeated: {resumed:?}"
    );
}
