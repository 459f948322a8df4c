//! Epochs and local checkpoint chains: `mirrorvm run --checkpoint-dir` cut at random
//! moments by kill -9, then `mirrorvm restore --from` continues the guest exactly
//! where its last complete checkpoint was cut. Also: a page written only by the VMM
//! is in the dirty set, a corrupted checkpoint directory is refused clearly, a chain
//! of lz4 and zero pages restores, and the Linux kernel restored in the middle of its
//! boot goes on to mount its root.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Starts `mirrorvm run` of the test guest with `cmdline` (plus `extra` arguments),
/// checkpointing every `epoch_ms` into `ck`; returns once `started` matched a line
/// and the first checkpoint is complete.
fn start_checkpointed(
    ck: &std::path::Path,
    cmdline: &str,
    epoch_ms: u32,
    extra: &[&str],
    started: impl Fn(&str) -> bool,
) -> Running {
    let mut c = mirrorvm();
    c.args([
        "run",
        "--cmdline",
        cmdline,
        "--epoch-ms",
        &epoch_ms.to_string(),
    ])
    .args(extra)
    .arg("--checkpoint-dir")
    .arg(ck);
    let mut r = Running::spawn(c);
    assert!(
        r.wait_for(Duration::from_secs(30), started),
        "the guest did not start:\n{}",
        r.seen.join("\n")
    );
    assert!(
        wait_checkpoint(ck, 1, Duration::from_secs(30)),
        "no checkpoint completed"
    );
    r
}

/// A tiny deterministic generator for kill moments (no wall-clock seeding: a
/// failing run can be repeated with MIRRORVM_TEST_SEED).
fn kill_delays(n: usize) -> Vec<Duration> {
    let mut s: u64 = std::env::var("MIRRORVM_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Duration::from_millis(300 + (s >> 33) % 1200)
        })
        .collect()
}

#[test]
fn counter_killed_at_random_moments_resumes_from_its_last_checkpoint() {
    if skip_without_kvm!() {
        return;
    }
    for (round, delay) in kill_delays(3).into_iter().enumerate() {
        let dir = tempdir();
        let ck = dir.path().join("ck");
        let r = start_checkpointed(&ck, "counter interval_ms=10", 20, &[], |l| l == "counter 3");
        std::thread::sleep(delay);
        let before = counters(r.kill9().iter());
        let last = *before.last().expect("printed values");
        assert!(last > 3);

        let mut c = mirrorvm();
        c.args(["restore", "--from"]).arg(&ck);
        let mut r = Running::spawn(c);
        let ok = r.wait_for(Duration::from_secs(30), |l| {
            l.strip_prefix("counter ")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v > last + 20)
        });
        let after = counters(r.seen.iter());
        let err = if ok { String::new() } else { r.stderr() };
        assert!(
            ok,
            "round {round}: restored guest did not count on: {after:?}\n{err}"
        );
        let first = after[0];
        // It resumes at the value it had at its last complete checkpoint. Output
        // commit holds each epoch's console output until its checkpoint is complete,
        // so no line is ever shown twice: the restored guest starts after the last
        // line printed. (Lines of a checkpoint completed in the instant before the
        // kill, but not yet released, are never shown: a small gap, never a repeat.)
        assert!(first > 1, "round {round}: resumed at {first}");
        assert!(
            first > last,
            "round {round}: line {first} shown twice (last printed before the kill: {last})"
        );
        // How far past: output is released when the sink's write returns, which for
        // a directory is after the checkpoint file was synced (and, when the chain
        // reached its bound, folded into the memory image). Under heavy I/O (a fresh-clone CI run beside
        // kernel builds measured a 4 s gap: 400 lines at 10 ms) those syncs take
        // seconds, so this only catches a restore that lands absurdly far ahead.
        assert!(
            first <= last + 3000,
            "round {round}: resumed at {first}, far past the last printed {last}"
        );
        // And keeps counting, one by one.
        for w in after.windows(2) {
            assert_eq!(w[1], w[0] + 1, "round {round}: {after:?}");
        }
    }
}

#[test]
fn dirty_pages_survive_kill_and_restore() {
    if skip_without_kvm!() {
        return;
    }
    // The `dirty` workload checks that every page still holds its previous write:
    // a page missing from a checkpoint shows up as a failure after the restore.
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let r = start_checkpointed(&ck, "dirty pages_per_ms=50 mb=16", 25, &[], |l| {
        l.contains("pages dirtied")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let _ = r.kill9();

    let mut c = mirrorvm();
    c.args(["restore", "--from"])
        .arg(&ck)
        .args(["--epoch-ms", "25", "--checkpoint-dir"])
        .arg(dir.path().join("ck2"));
    let mut r = Running::spawn(c);
    // Three more progress lines with no verification failure.
    // Until three progress lines, or a failure: this machine may be busy, so the
    // deadline is generous; a verification failure ends the wait at once.
    let progress = std::cell::Cell::new(0);
    let ok = r.wait_for(Duration::from_secs(60), |l| {
        if l.contains("pages dirtied") {
            progress.set(progress.get() + 1);
        }
        l.contains("FAIL") || l.contains("lost") || l.contains("mismatch") || progress.get() >= 3
    });
    let failed = ok && progress.get() < 3;
    let lines = r.seen.clone();
    let progress = progress.get();
    let err = r.stderr();
    assert!(
        !failed,
        "the restored guest found a lost page:\n{}\n{err}",
        lines.join("\n")
    );
    assert!(
        progress >= 3,
        "restored guest made no progress:\n{}\n{err}",
        lines.join("\n")
    );
}

#[test]
fn a_page_written_only_by_the_vmm_is_in_the_dirty_set() {
    if skip_without_kvm!() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("kvm");
    let vm = kvm.create_vm().expect("vm");
    let mem = vmm::memory::create(32 << 20).expect("memory");
    vmm::memory::register(&vm, &mem, true).expect("register with dirty logging");
    // Clear both logs, then write one page the way a device does (through vm-memory).
    let _ = vmm::dirty::harvest(&vm, &mem).expect("harvest");
    use vm_memory::Bytes;
    mem.write_slice(&[0xab; 64], vm_memory::GuestAddress(0x12_3000 + 100))
        .unwrap();
    // KVM's own log does not see it ...
    let kvm_only = vm.get_dirty_log(0, 32 << 20).expect("dirty log");
    assert!(
        kvm_only.iter().all(|w| *w == 0),
        "KVM saw a write it cannot see"
    );
    mem.write_slice(&[0xcd; 8], vm_memory::GuestAddress(0x45_6000))
        .unwrap();
    // ... the harvest does, and the staged copy holds the device's bytes.
    let set = vmm::dirty::harvest(&vm, &mem).expect("harvest");
    let pages: Vec<u64> = set.pages().collect();
    assert!(pages.contains(&0x45_6000), "{pages:x?}");
    let mut staged = vmm::dirty::StagedPages::default();
    staged.copy_from(&mem, &set).unwrap();
    let i = staged.addrs.iter().position(|a| *a == 0x45_6000).unwrap();
    assert_eq!(&staged.data[i * 4096..i * 4096 + 8], &[0xcd; 8]);
    // And the next harvest is empty again: nothing is counted twice, nothing lost.
    assert_eq!(vmm::dirty::harvest(&vm, &mem).unwrap().count(), 0);
}

#[test]
fn a_chain_of_compressed_and_zero_pages_restores_and_the_guest_checks_itself() {
    if skip_without_kvm!() {
        return;
    }
    use vmm::checkpoint::{directory, format, pagecodec::Compression, Checkpoint};
    const MEMORY: u64 = 64 << 20;
    // The top page of RAM: neither the test guest's image, its stacks nor the
    // `dirty` region (16 MiB from the first MiB after the image) reach it.
    const TOP: u64 = MEMORY - 4096;
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let r = start_checkpointed(
        &ck,
        "dirty pages_per_ms=50 mb=16 verify=1",
        25,
        &["--memory", "64M"],
        |l| l.contains("pages dirtied"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = r.kill9();

    // The chain after the image stores the `dirty` pages (a few words each) as lz4.
    let chain = directory::list_checkpoints(&ck).unwrap();
    let base: u64 = std::fs::read_to_string(ck.join("memory.epoch"))
        .expect("memory.epoch")
        .trim()
        .parse()
        .unwrap();
    let read = |path: &std::path::Path| {
        let bytes = std::fs::read(path).unwrap();
        format::read(&mut bytes.as_slice(), bytes.len() as u64, MEMORY / 4096).unwrap()
    };
    let mut compressed = 0;
    for (e, path) in chain.iter().filter(|(e, _)| *e > base) {
        let d = read(path);
        assert_eq!(d.header.version, format::VERSION, "{e}");
        compressed += d.stored.compressed;
    }
    assert!(
        compressed > 0,
        "no compressed page in the chain {chain:?} after {base}"
    );
    // Give the newest checkpoint zero pages over non-zero data: garbage in the image
    // at the top of RAM, where the guest never looks, that its replay must clear.
    let img = ck.join("memory.img");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 4096], TOP).unwrap();
    f.sync_all().unwrap();
    let (_, last) = chain.last().unwrap().clone();
    let mut d = read(&last);
    d.pages.addrs.push(TOP);
    d.pages.data.extend_from_slice(&[0; 4096]);
    let c = Checkpoint {
        epoch: d.header.epoch,
        full: d.header.flags & format::FLAG_FULL != 0,
        state: d.state,
        pages: d.pages,
        ..Default::default()
    };
    let mut bytes = Vec::new();
    let w = format::write(&mut bytes, &c, Compression::Lz4, &mut Vec::new()).unwrap();
    assert!(w.pages.zero >= 1);
    std::fs::write(&last, &bytes).unwrap();

    // Restored, the guest finds every page it wrote; its memory, pre-copied into a
    // new chain, has the zero page where the image had garbage.
    let ck2 = dir.path().join("ck2");
    let mut c = mirrorvm();
    c.args(["restore", "--from"])
        .arg(&ck)
        .args(["--epoch-ms", "25", "--checkpoint-dir"])
        .arg(&ck2);
    let mut r = Running::spawn(c);
    let progress = std::cell::Cell::new(0);
    let ok = r.wait_for(Duration::from_secs(60), |l| {
        if l.contains("pages dirtied") {
            progress.set(progress.get() + 1);
        }
        l.contains("FAIL") || l.contains("expected") || progress.get() >= 3
    });
    let restored_ok = ok && progress.get() >= 3;
    let has_base = wait_checkpoint(&ck2, 1, Duration::from_secs(30));
    let lines = r.seen.clone();
    let err = r.stderr();
    assert!(
        restored_ok,
        "the restored guest failed its check or made no progress:\n{}\n{err}",
        lines.join("\n")
    );
    assert!(has_base, "the restored run wrote no checkpoint:\n{err}");
    let top = std::fs::read(ck2.join("memory.img")).unwrap();
    assert!(
        top[usize::try_from(TOP).unwrap()..].iter().all(|b| *b == 0),
        "the zero page did not replace the image's page"
    );
}

fn first_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "mvc"))
        .expect("a checkpoint file")
}

#[test]
fn corrupted_checkpoint_directories_are_refused_clearly() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let mut c = mirrorvm();
    c.args([
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "counter interval_ms=10 limit=200",
        "--epoch-ms",
        "20",
        "--checkpoint-dir",
    ])
    .arg(&ck);
    let o = run_with_timeout(c, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    let restore = |d: &std::path::Path| {
        let mut c = mirrorvm();
        c.args(["restore", "--serial", "off", "--from"]).arg(d);
        run_with_timeout(c, Duration::from_secs(60))
    };
    let expect = |o: &std::process::Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}", show(o));
        assert!(err.contains(needle), "expected '{needle}':\n{}", show(o));
        assert!(!err.contains("panicked"), "{}", show(o));
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{}",
            show(o)
        );
    };

    // The guest ended that run itself: nothing to resume, and restore says so.
    expect(&restore(&ck), "the guest ended that run itself");
    // Without that mark, the chain itself is sound; from here on, damage it.
    std::fs::remove_file(ck.join("finished")).unwrap();

    // A flipped byte in the state.
    let file = first_checkpoint(&ck);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&file, &bad).unwrap();
    expect(&restore(&ck), "checksum mismatch");
    // A torn file.
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    expect(&restore(&ck), "header says");
    // A header from the future.
    let mut newer = good.clone();
    newer[8] = 99;
    std::fs::write(&file, &newer).unwrap();
    expect(&restore(&ck), "format version 99");
    // Not a checkpoint at all.
    std::fs::write(&file, vec![0x42; 4096]).unwrap();
    expect(&restore(&ck), "not a mirrorvm checkpoint");
    // A truncated memory image.
    std::fs::write(&file, &good).unwrap();
    let img = ck.join("memory.img");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(4096).unwrap();
    expect(&restore(&ck), "memory image is 4096 bytes");
    // Nothing there.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect(&restore(&empty), "no complete checkpoint");
    expect(
        &restore(&dir.path().join("missing")),
        "cannot read directory",
    );
}

#[test]
fn linux_restored_in_the_middle_of_its_boot_mounts_its_root() {
    if skip_without_kvm!() {
        return;
    }
    let out = linux_artifacts();
    let dir = tempdir();
    let img = dir.path().join("root.ext4");
    make_ext4(&img, 32 << 20);
    let ck = dir.path().join("ck");
    // A writable root on a checkpointed disk: its writes stay in store regions
    // until their checkpoint is complete.
    let cmdline = LINUX_CMDLINE;
    let mut c = mirrorvm();
    c.arg("run")
        .arg("--kernel")
        .arg(out.join("vmlinux"))
        .args([
            "--memory",
            "128M",
            "--cmdline",
            cmdline,
            "--epoch-ms",
            "25",
            "--checkpoint-dir",
        ])
        .arg(&ck)
        .arg("--disk")
        .arg(format!("path={},readonly=on", img.display()));
    let mut r = Running::spawn(c);
    // After the banner, before the root mount: when the virtio-mmio device is
    // registered (the driver has not probed the disk yet).
    assert!(
        r.wait_for(Duration::from_secs(120), |l| l
            .contains("virtio-mmio: Registering device")),
        "Linux did not get far enough:\n{}",
        r.seen.join("\n")
    );
    assert!(
        wait_checkpoint(&ck, 1, Duration::from_secs(10)),
        "no checkpoint completed"
    );
    let before = r.kill9();
    assert!(before.iter().any(|l| l.contains("Linux version")));
    assert!(
        !before.iter().any(|l| l.contains("VFS: Mounted root")),
        "killed too late:\n{}",
        before.join("\n")
    );

    let mut c = mirrorvm();
    c.args(["restore", "--from"]).arg(&ck);
    let mut r = Running::spawn(c);
    let ok = r.wait_for(Duration::from_secs(180), |l| {
        l.contains("VFS: Mounted root (ext4 filesystem)")
    });
    let seen = r.seen.clone();
    let err = if ok { String::new() } else { r.stderr() };
    assert!(
        ok,
        "restored kernel did not mount its root:\n{}\n{err}",
        seen.join("\n")
    );
    assert!(
        seen.iter().any(|l| l.contains("virtio_blk virtio0: [vda]")),
        "{}",
        seen.join("\n")
    );
}

#[test]
fn two_vcpus_with_a_checkpointed_disk_restore_with_memory_and_disk_agreeing() {
    if skip_without_kvm!() {
        return;
    }
    // `mix`: vCPU 1 dirties and verifies memory while vCPU 0 rewrites disk records,
    // each round checking the previous one: after a restore, memory and disk must
    // be from the same cut, or the guest reports the disagreement.
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 32 << 20);
    let ck = dir.path().join("ck");
    let disk = format!("path={},checkpoint=on", img.display());
    let r = start_checkpointed(
        &ck,
        "mix seconds=0",
        25,
        &["--cpus", "2", "--disk", &disk],
        |l| l.starts_with("mix: disk:"),
    );
    std::thread::sleep(Duration::from_millis(1200));
    let _ = r.kill9();

    let mut c = mirrorvm();
    c.args(["restore", "--from"])
        .arg(&ck)
        .args(["--epoch-ms", "25", "--checkpoint-dir"])
        .arg(dir.path().join("ck2"));
    let mut r = Running::spawn(c);
    // Until both vCPUs reported twice, or a failure (generous deadline: the
    // machine may be busy).
    let (disk, mem) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let stopped = r.wait_for(Duration::from_secs(60), |l| {
        if l.starts_with("mix: disk:") {
            disk.set(disk.get() + 1);
        }
        if l.starts_with("mix: memory:") {
            mem.set(mem.get() + 1);
        }
        let lower = l.to_lowercase();
        lower.contains("fail")
            || lower.contains("lost")
            || lower.contains("disagree")
            || lower.contains("error")
            || (disk.get() >= 2 && mem.get() >= 2)
    });
    let bad = stopped && !(disk.get() >= 2 && mem.get() >= 2);
    let lines = r.seen.clone();
    let err = r.stderr();
    assert!(
        !bad,
        "the restored guest found memory and disk disagreeing:\n{}\n{err}",
        lines.join("\n")
    );
    let disk_rounds = lines.iter().filter(|l| l.starts_with("mix: disk:")).count();
    let mem_rounds = lines
        .iter()
        .filter(|l| l.starts_with("mix: memory:"))
        .count();
    assert!(
        disk_rounds >= 2 && mem_rounds >= 2,
        "both vCPUs must go on after the restore:\n{}\n{err}",
        lines.join("\n")
    );
}

#[test]
fn a_failing_sink_is_retried_while_the_guest_runs_on() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let away = dir.path().join("ck.away");
    let mut r = start_checkpointed(
        &ck,
        "counter interval_ms=10",
        20,
        &["--memory", "64M"],
        |l| l.starts_with("counter "),
    );
    // Take the directory away: every write to it fails, and is retried.
    std::fs::rename(&ck, &away).unwrap();
    let stuck_at = memory_epoch(&away).unwrap();
    let last_seen = |r: &mut Running, ms: u64| {
        r.collect_for(Duration::from_millis(ms));
        counters(r.seen.iter()).last().copied().unwrap_or(0)
    };
    let before = last_seen(&mut r, 300);
    let during = last_seen(&mut r, 1000);
    // Output commit: nothing new is shown while no checkpoint can complete.
    assert!(
        during <= before + 10,
        "output was released without a checkpoint ({before} -> {during})"
    );
    assert_eq!(
        memory_epoch(&away),
        Some(stuck_at),
        "nothing can complete meanwhile"
    );
    // Bring it back: the checkpoint in flight lands, and the chain goes on.
    std::fs::rename(&away, &ck).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while memory_epoch(&ck).unwrap_or(0) < stuck_at + 3 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let resumed = memory_epoch(&ck).unwrap_or(0);
    assert!(
        resumed >= stuck_at + 3,
        "checkpointing did not resume: epoch {stuck_at} -> {resumed}"
    );
    // The guest ran all along (about 100 lines a second), and the held output is
    // released whole, in order.
    let after = last_seen(&mut r, 500);
    assert!(
        after >= during + 80,
        "the guest did not run during the outage ({during} -> {after})"
    );
    let all = counters(r.seen.iter());
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "console lines lost or repeated: {all:?}");
    }
    let printed = r.kill9();
    let last = counters(printed.iter()).last().copied().unwrap_or(0);

    let mut c = mirrorvm();
    c.args(["restore", "--from"]).arg(&ck);
    let mut r = Running::spawn(c);
    assert!(
        r.wait_for(Duration::from_secs(30), |l| l.starts_with("counter ")),
        "restore printed nothing"
    );
    let first = counters(r.seen.iter())[0];
    let _ = r.kill9();
    // A checkpoint cut after the directory came back: later than the outage. As in
    // the kill tests above, output commit means no line is shown twice (the lines
    // of a checkpoint completed just before the kill may never be shown: a small
    // gap is allowed, a repeat never).
    assert!(
        first > during,
        "resumed at {first}, before the outage ended at {during}"
    );
    assert!(
        first > last,
        "line {first} shown twice (last printed before the kill: {last})"
    );
    assert!(
        first <= last + 200,
        "resumed at {first}, far past the last printed {last}"
    );
}

#[test]
fn a_full_disk_region_ends_the_epoch_early() {
    if skip_without_kvm!() {
        return;
    }
    // Epochs of a minute, but the guest writes 16 MiB per round: every cut after
    // the first comes from the region passing its high-water mark (12 MiB of the
    // default 16 MiB region of a 64 MiB disk).
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 64 << 20);
    let region = devices::store::sizing::default_region_size(64 << 20);
    assert_eq!(region, 16 << 20);
    let ck = dir.path().join("ck");
    let metrics = dir.path().join("metrics.jsonl");
    let disk = format!("path={},checkpoint=on", img.display());
    let m = metrics.to_str().unwrap();
    let r = start_checkpointed(
        &ck,
        "disk rounds=0 records=4096",
        60_000,
        &["--disk", &disk, "--metrics", m],
        |l| l.starts_with("disk: round 1:"),
    );
    let cuts = || read_metrics(&metrics).unwrap_or_else(|e| panic!("{e}"));
    let end = Instant::now() + Duration::from_secs(60);
    while cuts().len() < 3 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = r.kill9();
    let got = cuts();
    assert!(
        got.len() >= 3,
        "no early cuts in a minute-long epoch: {got:?}"
    );
    for m in &got[1..3] {
        assert!(
            m.region_bytes >= region / 4 * 3,
            "an early cut before the high-water mark: {m:?}"
        );
        assert!(
            m.region_bytes <= region,
            "a region past its capacity: {m:?}"
        );
        // The metrics say how long each epoch lasted: far less than the minute.
        assert!(
            m.epoch_us > 0 && m.epoch_us < 30_000_000,
            "an early cut's epoch length is wrong: {m:?}"
        );
    }
    assert_eq!(
        got[0].epoch_us, 0,
        "the run's first cut has no epoch before it"
    );
}

#[test]
fn stopping_the_vmm_cuts_a_final_checkpoint_that_restore_resumes() {
    if skip_without_kvm!() {
        return;
    }
    // SIGTERM (like Ctrl-A x) ends the run with one last checkpoint, vCPUs parked:
    // every line the guest printed is covered, the checkpointed disk is at exactly
    // that checkpoint, and restore continues with the very next line.
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 32 << 20);
    let ck = dir.path().join("ck");
    let disk = format!("path={},checkpoint=on", img.display());
    let mut r = start_checkpointed(&ck, "counter interval_ms=10", 25, &["--disk", &disk], |l| {
        l.starts_with("counter ")
    });
    std::thread::sleep(Duration::from_millis(800));
    r.signal(libc::SIGTERM);
    let status = r
        .wait_exit(Duration::from_secs(60))
        .expect("mirrorvm did not stop on SIGTERM");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        r.seen.join("\n")
    );
    let mut before = r.seen.clone();
    assert!(
        !ck.join("finished").exists(),
        "a stopped guest is not finished"
    );

    let mut c = mirrorvm();
    c.args(["restore", "--from"]).arg(&ck);
    let mut r = Running::spawn(c);
    let ok = r.wait_for(Duration::from_secs(30), |l| l.starts_with("counter "));
    assert!(ok, "restore printed nothing: {}", r.stderr());
    // The final cut may fall while the guest writes a line (one port write per
    // byte): its start was shown by the stopped VMM, its end comes from the restored
    // guest. Joined, they make the next line.
    let mut after = r.seen.clone();
    if after.first().is_some_and(|l| !l.starts_with("counter ")) {
        let end = after.remove(0);
        let start = before.pop().unwrap_or_default();
        after.insert(0, format!("{start}{end}"));
    }
    let last = *counters(before.iter()).last().expect("printed values");
    let first = counters(after.iter()).first().copied();
    assert_eq!(
        first,
        Some(last + 1),
        "the restored guest must continue with the very next line (before: {:?}, after: {:?})",
        before.last(),
        after.first()
    );
}

#[test]
fn a_swapped_disk_journal_is_refused_before_anything_is_touched() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_image(&a, 16 << 20);
    make_image(&b, 16 << 20);
    let ck = dir.path().join("ck");
    let disk = format!("path={},checkpoint=on", a.display());
    let mut r = start_checkpointed(
        &ck,
        "counter interval_ms=10",
        25,
        &["--memory", "64M", "--disk", &disk],
        |l| l.starts_with("counter "),
    );
    r.signal(libc::SIGTERM);
    let status = r
        .wait_exit(Duration::from_secs(60))
        .expect("mirrorvm did not stop on SIGTERM");
    let seen = r.seen.join("\n");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{seen}\n{}",
        r.stderr()
    );
    // Another disk's journal, put in place of a's.
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "disk records=4", "--disk"])
        .arg(format!("path={},checkpoint=on", b.display()));
    let o = run_with_timeout(c, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let (ja, jb) = (dir.path().join("a.img.mvj"), dir.path().join("b.img.mvj"));
    let before = std::fs::read(&jb).unwrap();
    std::fs::copy(&jb, &ja).unwrap();

    let mut c = mirrorvm();
    c.args(["restore", "--serial", "off", "--from"]).arg(&ck);
    let o = run_with_timeout(c, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("is not the one this checkpoint was taken with"),
        "{}",
        show(&o)
    );
    // Refused before recovery: the journal in a's place is byte for byte untouched.
    assert_eq!(
        std::fs::read(&ja).unwrap(),
        before,
        "the refused journal was modified"
    );
}
