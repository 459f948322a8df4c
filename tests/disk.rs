//! virtio-blk from the guest's side and the host's: the test guest's `disk` workload
//! writes checksummed records across the disk, and the host checks them in the image
//! afterwards; the host writes records and the guest verifies them; read-only disks
//! refuse writes; a hostile guest cannot break the device or the VMM.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const REC_SIZE: usize = 4096;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// First sector of record `i` of `n` on a disk of `capacity` sectors
/// (resources/testguest/README.md).
fn record_sector(i: u32, n: u32, capacity: u64) -> u64 {
    let slots = capacity / 8;
    8 * ((u64::from(i) * slots) / u64::from(n))
}

/// The record the guest writes, computed independently on the host.
fn record(i: u32, n: u32, sector: u64, seed: u64) -> Vec<u8> {
    let mut r = vec![0u8; REC_SIZE];
    r[..8].copy_from_slice(b"MVMREC01");
    r[8..12].copy_from_slice(&i.to_le_bytes());
    r[12..16].copy_from_slice(&n.to_le_bytes());
    r[16..24].copy_from_slice(&sector.to_le_bytes());
    r[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut state = seed ^ (u64::from(i) << 32);
    for k in 0..(0xffc - 0x20) / 4 {
        let w = splitmix64(&mut state) as u32;
        r[0x20 + 4 * k..0x24 + 4 * k].copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&r[..0xffc]);
    r[0xffc..].copy_from_slice(&crc.to_le_bytes());
    r
}

fn check_records(img: &Path, n: u32, seed: u64) {
    let data = std::fs::read(img).expect("read image");
    let capacity = data.len() as u64 / 512;
    let mut sectors = Vec::new();
    for i in 0..n {
        let s = record_sector(i, n, capacity);
        sectors.push(s);
        let at = (s * 512) as usize;
        let got = &data[at..at + REC_SIZE];
        let crc = u32::from_le_bytes(got[0xffc..].try_into().unwrap());
        assert_eq!(
            crc,
            crc32c::crc32c(&got[..0xffc]),
            "record {i} at sector {s}: bad CRC"
        );
        assert_eq!(
            got,
            &record(i, n, s, seed)[..],
            "record {i} at sector {s} differs"
        );
    }
    // The records really are spread across the disk.
    assert_eq!(sectors[0], 0);
    assert!(
        *sectors.last().unwrap() > capacity * 3 / 4,
        "records not spread: {sectors:?}"
    );
}

fn run_disk(img: &Path, extra: &str, cmdline: &str) -> std::process::Output {
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", cmdline, "--disk"])
        .arg(format!("path={}{extra}", img.display()));
    run_with_timeout(c, T)
}

#[test]
fn guest_records_verify_from_the_host() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    make_image(&img, 64 << 20);
    let o = run_disk(&img, "", "disk records=64 seed=12345");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("64 records verified"),
        "{}",
        show(&o)
    );
    check_records(&img, 64, 12345);
}

#[test]
fn host_records_verify_in_the_guest_and_corruption_is_caught() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    let size = 32u64 << 20;
    let n = 40u32;
    let seed = 99u64;
    let mut data = vec![0u8; size as usize];
    for i in 0..n {
        let s = record_sector(i, n, size / 512);
        let at = (s * 512) as usize;
        data[at..at + REC_SIZE].copy_from_slice(&record(i, n, s, seed));
    }
    std::fs::write(&img, &data).unwrap();
    let cmd = format!("disk records={n} seed={seed} mode=verify");
    let o = run_disk(&img, ",readonly=on", &cmd);
    assert_eq!(
        o.status.code(),
        Some(0),
        "host-written records rejected:\n{}",
        show(&o)
    );

    // Flip one payload byte of record 17: the guest's read path must see it.
    let s = record_sector(17, n, size / 512);
    data[(s * 512) as usize + 100] ^= 0x40;
    std::fs::write(&img, &data).unwrap();
    let o = run_disk(&img, ",readonly=on", &cmd);
    assert_eq!(
        o.status.code(),
        Some(1),
        "corruption not detected:\n{}",
        show(&o)
    );
}

#[test]
fn readonly_disks_refuse_writes() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("ro.img");
    make_image(&img, 16 << 20);
    let o = run_disk(&img, ",readonly=on", "disk records=8 seed=1 mode=write");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let data = std::fs::read(&img).unwrap();
    assert!(
        data.iter().all(|b| *b == 0),
        "a read-only image was modified"
    );
}

#[test]
fn hostile_descriptors_do_not_break_the_device_or_the_vmm() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("hostile.img");
    make_image(&img, 16 << 20);
    let o = run_disk(&img, "", "hostile");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        show(&o)
    );
    // Every case reported, and the device still served a normal write and read.
    for case in [
        "outside guest memory",
        "loop",
        "longer than the queue",
        "beyond the capacity",
        "unknown request",
        "missing status",
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(case))
            .unwrap_or_else(|| panic!("case '{case}' not run:\n{}", show(&o)));
        assert!(line.contains(" ok "), "case '{case}' misbehaved: {line}");
    }
    assert!(out.contains("device still works"), "{}", show(&o));
}
