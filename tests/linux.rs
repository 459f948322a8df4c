//! The Linux kernel as the honest outside client: the small vmlinux built by
//! resources/linux/build.sh boots on mirrorvm, its own virtio-mmio and virtio-blk
//! drivers find our disk, and it mounts an ext4 root from it. And the bzImage path:
//! a real bzImage is loaded and its boot parameters checked (booting it here would
//! run its decompressor in KVM's emulator for minutes; ENVIRONMENT.md).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

fn mount_count(img: &std::path::Path) -> u64 {
    let o = Command::new("dumpe2fs")
        .arg("-h")
        .arg(img)
        .output()
        .expect("dumpe2fs (e2fsprogs)");
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Mount count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mount count in dumpe2fs output:\n{text}"))
}

#[test]
fn linux_mounts_its_ext4_root_from_our_virtio_blk() {
    if skip_without_kvm!() {
        return;
    }
    let out = linux_artifacts();
    let dir = tempdir();
    let img = dir.path().join("root.ext4");
    make_ext4(&img, 32 << 20);
    let before = mount_count(&img);

    let mut c = mirrorvm();
    c.arg("run")
        .arg("--kernel")
        .arg(out.join("vmlinux"))
        .args(["--memory", "128M", "--cmdline", LINUX_CMDLINE])
        .arg("--disk")
        .arg(format!("path={}", img.display()));
    let o = run_with_timeout(c, Duration::from_secs(240));
    let log = String::from_utf8_lossy(&o.stdout);
    // The run ends through the i8042 reset (panic=1 reboot=k once init cannot run).
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        log.contains("Linux version 6.1"),
        "no banner:\n{}",
        show(&o)
    );
    assert!(
        log.contains("virtio_blk virtio0: [vda]"),
        "no vda:\n{}",
        show(&o)
    );
    assert!(
        log.contains("VFS: Mounted root (ext4 filesystem)"),
        "no root mount:\n{}",
        show(&o)
    );
    assert!(
        mount_count(&img) > before,
        "the guest's mount did not reach the image"
    );
}

#[test]
fn bzimage_loads_with_correct_boot_parameters() {
    let out = linux_artifacts();
    let bz = out.join("bzImage");
    let mem = vmm::memory::create(128 << 20).expect("memory");
    let mut f = std::fs::File::open(&bz).expect("bzImage");
    assert_eq!(
        vmm::boot::detect_format(&mut f).unwrap(),
        vmm::boot::KernelFormat::BzImage
    );
    let k = vmm::boot::load_kernel(&mem, &mut f).expect("load bzImage");
    assert_eq!(k.format, vmm::boot::KernelFormat::BzImage);
    let hdr = k.setup_header.expect("setup header");
    // The protected-mode kernel sits at 1 MiB; the 64-bit entry is 0x200 into it.
    assert_eq!(k.entry.0, vmm::layout::HIMEM_START + 0x200);
    assert!(hdr.xloadflags & 1 == 1, "XLF_KERNEL_64");
    let version = hdr.version;
    assert!(version >= 0x020c, "boot protocol {version:#x}");
    // The image in guest memory is the file's protected-mode part.
    let bytes = std::fs::read(&bz).unwrap();
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        hdr.setup_sects as usize
    };
    let pm_offset = (setup_sects + 1) * 512;
    let mut head = vec![0u8; 4096];
    mem.read_slice(&mut head, GuestAddress(vmm::layout::HIMEM_START))
        .unwrap();
    assert_eq!(&head[..], &bytes[pm_offset..pm_offset + 4096]);

    let cmdline = "console=ttyS0 root=/dev/vda";
    vmm::boot::load_cmdline(&mem, cmdline).unwrap();
    let initrd = Some((GuestAddress(0x400_0000), 4096));
    vmm::boot::write_zero_page(&mem, &k, cmdline.len() + 1, initrd).unwrap();
    let p: boot_params = mem
        .read_obj(GuestAddress(vmm::layout::ZERO_PAGE_START))
        .unwrap();
    assert_eq!({ p.hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    assert_eq!({ p.hdr.type_of_loader }, 0xff);
    assert_eq!(u64::from(p.hdr.cmd_line_ptr), vmm::layout::CMDLINE_START);
    assert_eq!({ p.hdr.cmdline_size } as usize, cmdline.len() + 1);
    assert_eq!({ p.hdr.ramdisk_image }, 0x400_0000);
    assert_eq!({ p.hdr.ramdisk_size }, 4096);
    // Fields the kernel set in its own header survive into the zero page.
    assert_eq!({ p.hdr.setup_sects }, { hdr.setup_sects });
    assert_eq!({ p.hdr.kernel_alignment }, { hdr.kernel_alignment });
    assert_eq!({ p.hdr.init_size }, { hdr.init_size });
    let mut cl = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut cl, GuestAddress(vmm::layout::CMDLINE_START))
        .unwrap();
    assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cl[cmdline.len()], 0);
    assert!(p.e820_entries >= 3);
}

#[test]
fn initramfs_is_built_and_loadable() {
    let out = linux_artifacts();
    let initrd = out.join("initramfs.cpio.gz");
    let size = std::fs::metadata(&initrd).expect("initramfs").len();
    assert!(size > 0);
    let mem = vmm::memory::create(128 << 20).unwrap();
    let mut f = std::fs::File::open(&initrd).unwrap();
    let (addr, n) =
        vmm::boot::load_initramfs(&mem, &mut f, 0x200_0000, vmm::boot::DEFAULT_INITRD_ADDR_MAX)
            .unwrap();
    assert_eq!(n, size);
    assert_eq!(addr.0 % 4096, 0);
    assert!(addr.0 + n <= 128 << 20);
    let mut magic = [0u8; 2];
    mem.read_slice(&mut magic, addr).unwrap();
    assert_eq!(magic, [0x1f, 0x8b], "gzip magic at the initramfs address");
}
