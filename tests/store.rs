//! The checkpoint store from the outside: `--disk ...,checkpoint=on` without epochs
//! (local policy), and `mirrorvm disk inspect/verify/recover` on the journal a
//! killed `mirrorvm run` left behind.

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
    .arg(format!("path={},checkpoint=on", img.display()))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut child = c.spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().expect("kill -9");
    let _ = child.wait();

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
        "no checkpoint was retired in 2.5 s:\n{text}"
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

    // A flipped byte in a record is found by verify, with a non-zero exit.
    let journal = dir.path().join("disk.img.mvj");
    let mut j = std::fs::read(&journal).unwrap();
    // Find a record: the inspect output after recovery may show none, so corrupt the
    // first non-zero byte past the headers of slot 0's data area.
    let start = j
        .iter()
        .enumerate()
        .skip(64 << 10)
        .find(|(_, b)| **b != 0)
        .map(|(i, _)| i);
    if let Some(i) = start {
        j[i] ^= 0xff;
        std::fs::write(&journal, &j).unwrap();
        let o = disk_cmd(&["verify"], &img);
        // Either the record is in a live region (checksum error) or in stale space
        // verify skips; it must never panic.
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("panicked"),
            "{}",
            show(&o)
        );
    }

    // Not a journal at all.
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
