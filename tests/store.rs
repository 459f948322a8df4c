//! The checkpoint store from the outside: `--disk ...,checkpoint=on` without epochs
//! (local policy), and `mirrorvm disk inspect/verify/recover` on the journal a
//! killed `mirrorvm run` left behind.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn disk_cmd(args: &[&str], img: &std::path::Path) -> std::process::Output {
    let mut c = mirrorvm();
    c.arg("disk").args(args).arg(img);
    run_with_timeout(c, T)
}

#[test]
fn after_a_clean_exit_the_base_image_alone_holds_the_disk() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 32 << 20);
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "disk records=32 seed=77", "--disk"])
        .arg(format!("path={},checkpoint=on", img.display()));
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // The base image alone, read as a plain read-only disk, holds every record.
    let mut c = mirrorvm();
    c.args([
        "run",
        "--cmdline",
        "disk records=32 seed=77 mode=verify",
        "--disk",
    ])
    .arg(format!("path={},readonly=on", img.display()));
    let o = run_with_timeout(c, T);
    assert_eq!(
        o.status.code(),
        Some(0),
        "records not in the base image:\n{}",
        show(&o)
    );
    let o = disk_cmd(&["inspect"], &img);
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        !text.contains("frozen") && !text.contains("sealed"),
        "regions left after a clean exit:\n{text}"
    );
}

#[test]
fn disk_tools_work_on_the_journal_of_a_killed_run() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 32 << 20);
    let ck = dir.path().join("ck");
    let mut c = mirrorvm();
    c.args([
        "run",
        "--cmdline",
        "disk rounds=0 records=16",
        "--epoch-ms",
        "25",
        "--checkpoint-dir",
    ])
    .arg(&ck)
    .arg("--disk")
    .arg(format!("path={},checkpoint=on", img.display()));
    let r = Running::spawn(c);
    // With two region slots, cut 3 needs region 1 retired (and a retire's header is
    // durable before it returns): once checkpoint 3 is complete, the base image
    // holds epoch 1 or later. The deadline only avoids a hang on a busy machine.
    assert!(
        wait_checkpoint(&ck, 3, Duration::from_secs(60)),
        "checkpoint 3 did not complete; epoch reached: {:?}",
        memory_epoch(&ck)
    );
    let _ = r.kill9();

    let o = disk_cmd(&["inspect"], &img);
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("journal format v1") && text.contains("slot 0") && text.contains("slot 1"),
        "{text}"
    );
    let base_epoch = |t: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix("base image at epoch "))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no base epoch in:\n{t}"))
    };
    assert!(
        base_epoch(&text) > 0,
        "no checkpoint was retired by checkpoint 3:\n{text}"
    );

    let o = disk_cmd(&["verify"], &img);
    assert!(o.status.success(), "{}", show(&o));

    let o = disk_cmd(&["recover"], &img);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("the base image now holds epoch"),
        "{}",
        show(&o)
    );
    // After recovery every region is free, and the journal still verifies.
    let o = disk_cmd(&["verify"], &img);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("verify: every checksum is good"),
        "{}",
        show(&o)
    );
}

#[test]
fn a_file_that_is_not_a_journal_is_refused() {
    let dir = tempdir();
    let other = dir.path().join("plain.img");
    make_image(&other, 1 << 20);
    let o = disk_cmd(&["inspect"], &other);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no region journal"),
        "{}",
        show(&o)
    );
}

/// A journal built byte by byte from docs/store-format.md (independently of
/// devices/src/store): two slots; slot 0 sealed at epoch 1 (parent 0) with two
/// write records; slot 1 empty. Returns the journal and the offsets of its records.
fn journal_with_a_sealed_region(base_len: u64) -> (Vec<u8>, [usize; 2]) {
    const CAPACITY: u64 = 16 << 10;
    const SLOTS: u32 = 2;
    const GENERATION: u64 = 7;
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let len = 4096 + SLOTS as usize * (4096 + CAPACITY as usize);
    let mut j = vec![0u8; len];

    // File header.
    j[0..8].copy_from_slice(b"MVMJRNL\0");
    put32(&mut j, 8, 1); // version
    put32(&mut j, 12, 64); // header_len
    put32(&mut j, 16, 512); // sector_size
    put32(&mut j, 20, SLOTS);
    put64(&mut j, 24, CAPACITY);
    put64(&mut j, 32, base_len);
    put64(&mut j, 40, 0); // created_epoch
    put64(&mut j, 48, 0x6d69_7272_6f72); // journal_id
    let crc = crc32c::crc32c(&j[0..60]);
    put32(&mut j, 60, crc);

    // Slot 0's records: (sector, data).
    let records: [(u64, Vec<u8>); 2] = [
        (0, vec![0x11; 512]),
        (8, (0..1024u32).map(|i| (i * 7 % 251) as u8).collect()),
    ];
    let slot0 = 4096;
    let mut at = slot0 + 4096;
    let mut offsets = [0usize; 2];
    for (seq, (sector, data)) in records.iter().enumerate() {
        offsets[seq] = at;
        let h = &mut j[at..at + 32];
        h[0..4].copy_from_slice(b"MVJW");
        put32(h, 4, seq as u32);
        put64(h, 8, GENERATION);
        put64(h, 16, *sector);
        put32(h, 24, data.len() as u32);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..28]), data);
        put32(h, 28, crc);
        j[at + 32..at + 32 + data.len()].copy_from_slice(data);
        at += 32 + data.len();
    }
    let used = (at - (slot0 + 4096)) as u64;

    // Slot 0's header, copy 0: sealed.
    let h = &mut j[slot0..slot0 + 72];
    h[0..4].copy_from_slice(b"MVJS");
    put32(h, 4, 0); // slot
    put64(h, 8, 1); // seq
    h[16] = 2; // sealed
    put32(h, 20, records.len() as u32); // record_count
    put64(h, 24, GENERATION);
    put64(h, 32, 1); // epoch
    put64(h, 40, 0); // parent_epoch
    put64(h, 48, used);
    put64(h, 56, 0); // base_epoch
    let crc = crc32c::crc32c(&h[0..68]);
    put32(h, 68, crc);
    (j, offsets)
}

#[test]
fn verify_names_the_record_with_a_flipped_byte_and_exits_non_zero() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    let base_len = 1 << 20;
    make_image(&img, base_len);
    let journal = dir.path().join("disk.img.mvj");
    let (good, [rec0, rec1]) = journal_with_a_sealed_region(base_len);

    // As built, the journal is sound: verify passes and sees the sealed region, so
    // the failures below come from the flipped byte alone.
    std::fs::write(&journal, &good).unwrap();
    let o = disk_cmd(&["verify"], &img);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("verify: every checksum is good"),
        "{}",
        show(&o)
    );
    assert!(
        out.contains("sealed"),
        "the region is not sealed:\n{}",
        show(&o)
    );

    let flipped = |at: usize, what: &str, needle: &str| {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        std::fs::write(&journal, &bad).unwrap();
        let o = disk_cmd(&["verify"], &img);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", show(&o));
        assert_eq!(
            err.lines().count(),
            1,
            "{what}: expected a one-line error:\n{}",
            show(&o)
        );
        assert!(
            err.starts_with("mirrorvm: error: ") && err.contains(needle),
            "{what}: expected '{needle}':\n{}",
            show(&o)
        );
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("every checksum is good"),
            "{what}: {}",
            show(&o)
        );
    };
    flipped(
        rec1 + 32 + 100,
        "a data byte of record 1",
        &format!("slot 0 (epoch 1): record 1 at journal offset {rec1} is bad"),
    );
    flipped(
        rec0 + 20,
        "the sector field of record 0",
        &format!("slot 0 (epoch 1): record 0 at journal offset {rec0} is bad"),
    );
    flipped(
        rec0 + 32 + 511,
        "the last data byte of record 0",
        &format!("slot 0 (epoch 1): record 0 at journal offset {rec0} is bad"),
    );
}

/// `region-size=2M` (the minimum): the `disk` guest's 4 KiB records fill a region
/// every few hundred writes, so with 1 s epochs every cut but the timer's comes from
/// a full region. The journal is 2 × 2 MiB, `disk inspect` says so, a run killed in
/// the middle restores (the journal's own size is used) and finishes its rounds with
/// every check passing, and asking for another size on that journal is refused.
#[test]
fn a_small_region_size_fills_cuts_and_restores() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 16 << 20);
    let ck = dir.path().join("ck");
    let metrics = dir.path().join("m.jsonl");
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "disk records=1024 rounds=8"])
        .args(["--epoch-ms", "1000", "--serial", "off", "--checkpoint-dir"])
        .arg(&ck)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--disk")
        .arg(format!(
            "path={},checkpoint=on,region-size=2M",
            img.display()
        ));
    let r = Running::spawn(c);
    let reached = wait_checkpoint(&ck, 5, Duration::from_secs(60));
    let err = r.kill9().join("\n");
    assert!(
        reached,
        "checkpoint 5 did not complete; epoch reached: {:?}\n{err}",
        memory_epoch(&ck)
    );
    let region = 2u64 << 20;
    let journal_len = std::fs::metadata(dir.path().join("disk.img.mvj"))
        .unwrap()
        .len();
    assert_eq!(journal_len, 4096 + 2 * (4096 + region));
    let m = read_metrics(&metrics).unwrap();
    assert!(m.iter().all(|c| c.region_bytes <= region), "{m:?}");
    // Cut at the high-water mark (3/4) or on a deferred write, not by the 1 s timer.
    let full = m
        .iter()
        .filter(|c| c.region_bytes >= region / 4 * 3)
        .count();
    assert!(full >= 3, "only {full} cuts on a full region: {m:?}");

    let o = disk_cmd(&["inspect"], &img);
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(
            "disk 16 MiB (16777216 bytes); region size 2 MiB (2097152 bytes); 2 region slots"
        ) && text.contains("journal 4108 KiB (4206592 bytes, 0.25 × the disk)"),
        "{text}"
    );

    // Another size on this journal: refused, one line, nothing run.
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "hello", "--serial", "off", "--disk"])
        .arg(format!(
            "path={},checkpoint=on,region-size=4M",
            img.display()
        ));
    let o = run_with_timeout(c, T);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("its journal has regions of 2 MiB but region-size asks for 4 MiB"),
        "{stderr}"
    );

    // Restore: the guest goes on from its checkpoint, regions still fill, and it
    // ends its rounds with every record verified.
    let metrics2 = dir.path().join("m2.jsonl");
    let mut c = mirrorvm();
    c.args(["restore", "--from"])
        .arg(&ck)
        .args(["--epoch-ms", "1000", "--checkpoint-dir"])
        .arg(dir.path().join("ck2"))
        .arg("--metrics")
        .arg(&metrics2);
    let o = run_with_timeout(c, Duration::from_secs(120));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("disk: 1024 records verified"), "{out}");
    let m2 = read_metrics(&metrics2).unwrap();
    assert!(
        m2.iter()
            .filter(|c| c.region_bytes >= region / 4 * 3)
            .count()
            >= 1,
        "no cut on a full region after the restore: {m2:?}"
    );
}

/// Bad region sizes are refused before anything runs, saying why (in clap's usage
/// error, like any bad option value), and no journal is created.
#[test]
fn bad_region_sizes_are_refused_before_anything_runs() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 1 << 20);
    for (value, says) in [
        ("1M", "region-size 1 MiB is below the minimum 2 MiB"),
        ("2G", "region-size 2 GiB is above the maximum 1 GiB"),
        ("3000001", "not a multiple of 4 KiB"),
        ("big", "invalid size 'big'"),
    ] {
        let mut c = mirrorvm();
        c.args(["run", "--disk"]).arg(format!(
            "path={},checkpoint=on,region-size={value}",
            img.display()
        ));
        let o = run_with_timeout(c, T);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{value}: {}", show(&o));
        assert!(stderr.contains(says), "{value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{value}: {stderr}");
    }
    assert!(!dir.path().join("disk.img.mvj").exists());
}
