//! Builds the project's test guest (`resources/testguest/`) into
//! `$OUT_DIR/testguest.elf` with the system gcc, for the VMM to embed with
//! `include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"))`.
//!
//! The guest is a static, freestanding, non-PIC x86-64 ELF linked at a fixed
//! physical address (see resources/testguest/layout.h and README.md).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Compiler flags for every guest source. The CPL3 code may use SSE2 (the
/// x86-64 baseline) but nothing newer: checkpoints must restore anywhere.
const CFLAGS: &[&str] = &[
    "-m64",
    "-march=x86-64",
    "-mtune=generic",
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",
    "-mno-red-zone",
    "-Wall",
    "-Wextra",
];

const LDFLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
];

const HELP: &str = "building the test guest needs gcc and GNU binutils (as, ld): \
                    on Debian install the packages `gcc` and `binutils` \
                    (apt-get install gcc binutils)";

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("test guest: could not run gcc ({what}): {e}; {HELP}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "test guest: gcc failed ({what}), {}:\n{stderr}\ncommand: {cmd:?}\n{HELP}",
            out.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=testguest: {line}");
    }
    out
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src: PathBuf = manifest.join("../resources/testguest");
    let src = src.canonicalize().unwrap_or(src);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.display());

    let mut sources: Vec<PathBuf> = Vec::new();
    let entries = fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("test guest: cannot read {}: {e}", src.display()));
    for entry in entries {
        let path = entry.expect("read_dir entry").path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "c" | "S" => sources.push(path.clone()),
            "h" | "in" | "sh" => {}
            _ => continue,
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
    sources.sort();
    assert!(
        !sources.is_empty(),
        "test guest: no sources in {}",
        src.display()
    );

    // The linker script shares layout.h with the code: preprocess it.
    let lds = out.join("testguest.lds");
    run(
        "preprocess the linker script",
        Command::new("gcc")
            .args(["-E", "-P", "-undef", "-x", "c", "-I"])
            .arg(&src)
            .arg(src.join("guest.lds.in"))
            .arg("-o")
            .arg(&lds),
    );

    let elf = out.join("testguest.elf");
    let mut cc = Command::new("gcc");
    cc.args(CFLAGS)
        .arg("-I")
        .arg(&src)
        .args(LDFLAGS)
        .arg("-T")
        .arg(&lds)
        .arg("-o")
        .arg(&elf)
        .args(&sources);
    run("compile and link", &mut cc);

    check_elf(&elf);

    // The CPL0 code must not use what the KVM emulator lacks (int3, x87,
    // SSE, xsave, rep movs/stos, ...): check-cpl0.sh disassembles it.
    run_check(Command::new("sh").arg(src.join("check-cpl0.sh")).arg(&elf));
    println!("cargo:rustc-env=TESTGUEST_ELF={}", elf.display());
}

fn run_check(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("test guest: could not run check-cpl0.sh: {e}; {HELP}"));
    if !out.status.success() {
        panic!(
            "test guest: check-cpl0.sh rejected the guest ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Cheap sanity check of the result: an ELF64 x86-64 executable.
fn check_elf(path: &Path) {
    let bytes =
        fs::read(path).unwrap_or_else(|e| panic!("test guest: read {}: {e}", path.display()));
    let ok = bytes.len() > 64
        && &bytes[0..4] == b"\x7fELF"
        && bytes[4] == 2 // ELFCLASS64
        && bytes[5] == 1 // little endian
        && u16::from_le_bytes([bytes[16], bytes[17]]) == 2 // ET_EXEC
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 62; // EM_X86_64
    assert!(
        ok,
        "test guest: {} is not an x86-64 ELF executable",
        path.display()
    );
}
