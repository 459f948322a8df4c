//! virtio-blk end to end: a driver written against the MMIO registers, descriptor tables
//! written into a real `GuestMemory`, requests executed by the device.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryRegion;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

pub(super) const MEM_SIZE: usize = 0x40_0000;
pub(super) const DESC_TABLE: u64 = 0x1000;
pub(super) const AVAIL_RING: u64 = 0x3000;
pub(super) const USED_RING: u64 = 0x4000;
const DATA: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;

/// An in-memory disk that counts what it does.
#[derive(Default)]
pub(super) struct MemDiskInner {
    pub data: Vec<u8>,
    pub flushes: usize,
    pub bytes: usize,
}

#[derive(Clone, Default)]
pub(super) struct MemDisk {
    pub inner: Arc<Mutex<MemDiskInner>>,
    pub would_block: Arc<AtomicBool>,
    pub ops: Arc<AtomicUsize>,
    /// Transfers that were not whole, aligned sectors within the bounce size.
    pub misaligned: Arc<AtomicUsize>,
    /// Sizes of the writes, in order.
    pub write_sizes: Arc<Mutex<Vec<usize>>>,
    /// The largest write request it takes (0: no limit).
    pub max_write: Arc<AtomicUsize>,
}

impl MemDisk {
    pub fn new(len: usize) -> Self {
        let disk = Self::default();
        disk.inner.lock().unwrap().data = (0..len).map(|i| (i / 512) as u8).collect();
        disk
    }
}

impl MemDisk {
    fn check_shape(&self, len: usize, offset: u64) {
        if len == 0 || len & 511 != 0 || offset & 511 != 0 || len > BOUNCE_LEN {
            self.misaligned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl DiskBackend for MemDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::SeqCst);
        self.check_shape(buf.len(), offset);
        let mut d = self.inner.lock().unwrap();
        let start = offset as usize;
        let src = d
            .data
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::other("read beyond the disk"))?;
        buf.copy_from_slice(src);
        d.bytes += buf.len();
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::SeqCst);
        self.check_shape(buf.len(), offset);
        self.write_sizes.lock().unwrap().push(buf.len());
        if self.would_block.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut d = self.inner.lock().unwrap();
        let start = offset as usize;
        d.data
            .get_mut(start..start + buf.len())
            .ok_or_else(|| io::Error::other("write beyond the disk"))?
            .copy_from_slice(buf);
        d.bytes += buf.len();
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().flushes += 1;
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.lock().unwrap().data.len() as u64
    }
    fn max_write_len(&self) -> u64 {
        match self.max_write.load(Ordering::SeqCst) {
            0 => u64::MAX,
            n => n as u64,
        }
    }
}

/// A minimal virtio-blk driver over the MMIO transport.
pub(super) struct Driver {
    pub mem: GuestMemory,
    pub transport: MmioTransport,
    pub block: Arc<Mutex<Block>>,
    pub disk: MemDisk,
    pub queue_size: u16,
    avail_idx: u16,
    used_seen: u16,
}

fn w(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(offset.into(), &value.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset.into(), &mut b);
    u32::from_le_bytes(b)
}

/// A descriptor for the tests: address, length, flags, next.
#[derive(Clone, Copy, Debug)]
pub(super) struct D(pub u64, pub u32, pub u16, pub u16);

pub(super) const R: u16 = 0;
pub(super) const WR: u16 = VRING_DESC_F_WRITE as u16;
pub(super) const NEXT: u16 = VRING_DESC_F_NEXT as u16;

impl Drop for Driver {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                self.disk.misaligned.load(Ordering::SeqCst),
                0,
                "the backend saw a transfer that is not whole aligned sectors"
            );
        }
    }
}

impl Driver {
    pub fn new(disk_len: usize, read_only: bool, queue_size: u16) -> Self {
        Self::with_mem(disk_len, read_only, queue_size, MEM_SIZE)
    }

    pub fn with_mem(disk_len: usize, read_only: bool, queue_size: u16, mem_size: usize) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        Self::with_memory(mem, disk_len, read_only, queue_size)
    }

    pub fn with_memory(
        mem: GuestMemory,
        disk_len: usize,
        read_only: bool,
        queue_size: u16,
    ) -> Self {
        let disk = MemDisk::new(disk_len);
        let block = Arc::new(Mutex::new(
            Block::new(
                Box::new(disk.clone()),
                read_only,
                b"mirrorvm-test-disk-0123",
            )
            .unwrap(),
        ));
        let mut transport = MmioTransport::new(block.clone(), mem.clone()).unwrap();
        let t = &mut transport;
        w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
        w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r(t, VIRTIO_MMIO_DEVICE_FEATURES);
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r(t, VIRTIO_MMIO_DEVICE_FEATURES);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, lo);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(t, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK, 0);
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        w(t, VIRTIO_MMIO_QUEUE_NUM, queue_size.into());
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(r(t, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(block.lock().unwrap().is_active());
        Self {
            mem,
            transport,
            block,
            disk,
            queue_size,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn features(&mut self) -> u64 {
        let t = &mut self.transport;
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r(t, VIRTIO_MMIO_DEVICE_FEATURES);
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r(t, VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    pub fn status(&mut self) -> u32 {
        r(&mut self.transport, VIRTIO_MMIO_STATUS)
    }

    pub fn write_desc(&self, table: u64, index: u16, d: D) {
        let desc = Descriptor::new(d.0, d.1, d.2, d.3);
        self.mem
            .write_obj(desc, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    /// Writes the chain at descriptors `first..`, linking them with NEXT, and makes it
    /// available. Returns the head.
    pub fn submit(&mut self, first: u16, chain: &[D]) -> u16 {
        for (i, d) in chain.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == chain.len();
            let flags = if last { d.2 } else { d.2 | NEXT };
            let next = if last { 0 } else { index + 1 };
            self.write_desc(DESC_TABLE, index, D(d.0, d.1, flags, next));
        }
        self.make_available(first);
        first
    }

    pub fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.queue_size);
        self.mem
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// The next used element: (id, len).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.queue_size);
        let base = USED_RING + 4 + slot * 8;
        let id = self.mem.read_obj(GuestAddress(base)).unwrap();
        let len = self.mem.read_obj(GuestAddress(base + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    pub fn process(&self) {
        self.block.lock().unwrap().process_queue();
    }

    pub fn header(&self, addr: u64, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type, GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    pub fn status_byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// One request through the queue: header at `hdr`, the given data descriptors,
    /// status at `status`. Returns (status byte, used len).
    pub fn request(&mut self, request_type: u32, sector: u64, data: &[D]) -> (u8, u32) {
        let hdr = DATA - PAGE;
        let status = DATA - 16;
        self.header(hdr, request_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut chain = vec![D(hdr, 16, R, 0)];
        chain.extend_from_slice(data);
        chain.push(D(status, 1, WR, 0));
        let head = self.submit(0, &chain);
        self.process();
        let (id, len) = self.pop_used().expect("request completed");
        assert_eq!(id, u32::from(head));
        assert_eq!(self.pop_used(), None);
        (self.status_byte(status), len)
    }

    pub fn is_dirty(&self, addr: u64) -> bool {
        let region = self.mem.find_region(GuestAddress(addr)).unwrap();
        region
            .bitmap()
            .dirty_at(addr as usize - region.start_addr().0 as usize)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn features_and_config() {
    let mut drv = Driver::new(8 * 512, false, 16);
    let f = drv.features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    drv.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut seg = [0u8; 4];
    drv.transport.read(0x10c, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    // Beyond the config: zeros; writes are ignored.
    drv.transport.read(0x1f0, &mut seg);
    assert_eq!(seg, [0; 4]);
    drv.transport.write(0x100, &[1, 2, 3, 4]);
    drv.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);

    let mut ro = Driver::new(8 * 512, true, 16);
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.block.lock().unwrap().device_type(), 2);
}

#[test]
fn read_write_flush_get_id() {
    let mut drv = Driver::new(64 * 512, false, 16);
    // Read sectors 2..4 into two buffers.
    let (status, len) = drv.request(
        VIRTIO_BLK_T_IN,
        2,
        &[D(DATA, 512, WR, 0), D(DATA + 0x2000, 512, WR, 0)],
    );
    assert_eq!((status, len), (OK, 1025));
    let mut buf = [0u8; 512];
    drv.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [2u8; 512]);
    drv.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(buf, [3u8; 512]);

    // Write sector 5 from a buffer split over two descriptors.
    drv.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA + 0x4000))
        .unwrap();
    let (status, len) = drv.request(
        VIRTIO_BLK_T_OUT,
        5,
        &[D(DATA + 0x4000, 100, R, 0), D(DATA + 0x4064, 924, R, 0)],
    );
    assert_eq!((status, len), (OK, 1));
    {
        let d = drv.disk.inner.lock().unwrap();
        assert!(d.data[5 * 512..7 * 512].iter().all(|&b| b == 0xab));
        assert_eq!(d.data[7 * 512], 7);
        assert_eq!(d.data[5 * 512 - 1], 4);
    }

    // The last sector, exactly.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 63, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, OK);

    let (status, len) = drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((status, len), (OK, 1));
    assert_eq!(drv.disk.inner.lock().unwrap().flushes, 1);

    drv.mem
        .write_slice(&[0xee; 32], GuestAddress(DATA))
        .unwrap();
    let (status, len) = drv.request(VIRTIO_BLK_T_GET_ID, 0, &[D(DATA, 32, WR, 0)]);
    assert_eq!((status, len), (OK, 33));
    let mut id = [0u8; 32];
    drv.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..20], b"mirrorvm-test-disk-0");
    assert_eq!(&id[20..], &[0; 12]);

    let (status, len) = drv.request(99, 0, &[D(DATA, 512, WR, 0)]);
    assert_eq!(
        (status, len),
        (UNSUPP, 1),
        "a failed request wrote only its status"
    );
}

#[test]
fn header_and_data_in_one_descriptor() {
    // The spec does not fix the framing: header and data may share a descriptor, and
    // data and status too.
    let mut drv = Driver::new(16 * 512, false, 16);
    let req = DATA;
    drv.header(req, VIRTIO_BLK_T_OUT, 1);
    drv.mem
        .write_slice(&[0x5a; 512], GuestAddress(req + 16))
        .unwrap();
    let head = drv.submit(0, &[D(req, 16 + 512, R, 0), D(DATA + PAGE, 1, WR, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 1)));
    assert_eq!(drv.status_byte(DATA + PAGE), OK);
    assert!(drv.disk.inner.lock().unwrap().data[512..1024]
        .iter()
        .all(|&b| b == 0x5a));

    drv.header(req, VIRTIO_BLK_T_IN, 3);
    let head = drv.submit(0, &[D(req, 16, R, 0), D(DATA + PAGE, 513, WR, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 513)));
    assert_eq!(drv.status_byte(DATA + PAGE + 512), OK);
    assert_eq!(drv.status_byte(DATA + PAGE + 511), 3);
}

#[test]
fn backend_sees_whole_sector_chunks() {
    let mut drv = Driver::new(4 << 20, false, 16);
    // 1024 bytes in segments of 100, 1, 411 and 512 bytes: one backend write.
    let segs = [
        D(DATA, 100, R, 0),
        D(DATA + 0x1000, 1, R, 0),
        D(DATA + 0x2000, 411, R, 0),
        D(DATA + 0x3000, 512, R, 0),
    ];
    for (i, d) in segs.iter().enumerate() {
        drv.mem
            .write_slice(&vec![i as u8 + 1; d.1 as usize], GuestAddress(d.0))
            .unwrap();
    }
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 3, &segs).0, OK);
    assert_eq!(*drv.disk.write_sizes.lock().unwrap(), vec![1024]);
    {
        let d = drv.disk.inner.lock().unwrap();
        let w = &d.data[3 * 512..5 * 512];
        assert!(w[..100].iter().all(|&b| b == 1));
        assert_eq!(w[100], 2);
        assert!(w[101..512].iter().all(|&b| b == 3));
        assert!(w[512..].iter().all(|&b| b == 4));
    }
    // Read it back scattered differently.
    let back = [D(DATA + 0x8000, 700, WR, 0), D(DATA + 0x9000, 324, WR, 0)];
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 3, &back).0, OK);
    let mut a = vec![0u8; 700];
    drv.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(
        (a[99], a[100], a[101], a[511], a[512], a[699]),
        (1, 2, 3, 3, 4, 4)
    );

    // 3 MiB in one segment: two writes, 2 MiB then 1 MiB.
    drv.disk.write_sizes.lock().unwrap().clear();
    let big = (MEM_SIZE as u64 - DATA) as u32;
    assert_eq!(big, 3 << 20);
    assert_eq!(
        drv.request(VIRTIO_BLK_T_OUT, 0, &[D(DATA, big, R, 0)]).0,
        OK
    );
    assert_eq!(
        *drv.disk.write_sizes.lock().unwrap(),
        vec![BOUNCE_LEN, 1 << 20]
    );
    assert_eq!(
        drv.request(VIRTIO_BLK_T_IN, 1, &[D(DATA, big, WR, 0)]),
        (OK, big + 1)
    );
}

#[test]
fn device_writes_mark_the_dirty_bitmap() {
    let mut drv = Driver::new(64 * 512, false, 16);
    let data = DATA + 0x8000;
    for addr in [data, data + PAGE, USED_RING, DATA - 16] {
        assert!(!drv.is_dirty(addr), "{addr:#x} dirty before the request");
    }
    let (status, _) = drv.request(
        VIRTIO_BLK_T_IN,
        0,
        &[D(data, 512, WR, 0), D(data + PAGE, 512, WR, 0)],
    );
    assert_eq!(status, OK);
    for addr in [data, data + PAGE, USED_RING, DATA - 16] {
        assert!(drv.is_dirty(addr), "{addr:#x} not dirty after the request");
    }
    assert!(!drv.is_dirty(data + 2 * PAGE));
}

#[test]
fn bad_sectors_and_lengths_get_ioerr() {
    let mut drv = Driver::new(64 * 512, false, 16);
    for (sector, len) in [
        (64, 512),
        (63, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
        (1 << 60, 512),
    ] {
        let (status, _) = drv.request(VIRTIO_BLK_T_IN, sector, &[D(DATA, len, WR, 0)]);
        assert_eq!(status, IOERR, "read sector {sector} len {len}");
        let (status, _) = drv.request(VIRTIO_BLK_T_OUT, sector, &[D(DATA, len, R, 0)]);
        assert_eq!(status, IOERR, "write sector {sector} len {len}");
    }
    // Not a multiple of 512.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, 100, WR, 0)]);
    assert_eq!(status, IOERR);
    let (status, _) = drv.request(VIRTIO_BLK_T_OUT, 0, &[D(DATA, 513, R, 0)]);
    assert_eq!(status, IOERR);
    // Short header.
    let status_addr = DATA - 16;
    let head = drv.submit(0, &[D(DATA, 8, R, 0), D(status_addr, 1, WR, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 1)));
    assert_eq!(drv.status_byte(status_addr), IOERR);
    // Nothing touched the disk.
    assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);
}

#[test]
fn capacity_rounds_down_a_ragged_disk() {
    let mut drv = Driver::new(4 * 512 + 100, false, 16);
    assert_eq!(drv.block.lock().unwrap().capacity(), 4);
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 4, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, IOERR);
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 3, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, OK);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut drv = Driver::new(8 * 512, true, 16);
    let (status, _) = drv.request(VIRTIO_BLK_T_OUT, 0, &[D(DATA, 512, R, 0)]);
    assert_eq!(status, IOERR);
    assert_eq!(drv.disk.inner.lock().unwrap().data[0], 0);
    assert_eq!(drv.disk.inner.lock().unwrap().bytes, 0);
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, OK);
    let (status, _) = drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, OK);
}

#[test]
fn buffers_outside_memory() {
    let mut drv = Driver::new(8 * 512, false, 16);
    let outside = MEM_SIZE as u64;
    // Data buffer outside guest memory, or straddling its end.
    for addr in [outside, outside - 256, u64::MAX - 100] {
        let (status, len) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(addr, 512, WR, 0)]);
        assert_eq!((status, len), (IOERR, 1), "buffer at {addr:#x}");
        let (status, _) = drv.request(VIRTIO_BLK_T_OUT, 0, &[D(addr, 512, R, 0)]);
        assert_eq!(status, IOERR, "buffer at {addr:#x}");
    }
    // Header outside memory.
    let status_addr = DATA - 16;
    drv.mem
        .write_obj(0xffu8, GuestAddress(status_addr))
        .unwrap();
    let head = drv.submit(0, &[D(outside, 16, R, 0), D(status_addr, 1, WR, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 1)));
    assert_eq!(drv.status_byte(status_addr), IOERR);
    // Status outside memory: dropped with used length 0.
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    let head = drv.submit(
        0,
        &[
            D(DATA, 16, R, 0),
            D(DATA + PAGE, 512, WR, 0),
            D(outside, 1, WR, 0),
        ],
    );
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 0)));
    assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);
    // The device still works.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, OK);
}

#[test]
fn wrong_directions() {
    let mut drv = Driver::new(8 * 512, false, 16);
    // IN whose data buffer is device-readable.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, 512, R, 0)]);
    assert_eq!(status, IOERR);
    // OUT whose data buffer is device-writable.
    let (status, _) = drv.request(VIRTIO_BLK_T_OUT, 0, &[D(DATA, 512, WR, 0)]);
    assert_eq!(status, IOERR);
    // A readable buffer after a writable one.
    let (status, _) = drv.request(
        VIRTIO_BLK_T_IN,
        0,
        &[D(DATA, 512, WR, 0), D(DATA + PAGE, 512, R, 0)],
    );
    assert_eq!(status, IOERR);
    // Writable header.
    let (status, _) = {
        let st = DATA - 16;
        drv.header(DATA - PAGE, VIRTIO_BLK_T_IN, 0);
        let head = drv.submit(0, &[D(DATA - PAGE, 16, WR, 0), D(st, 1, WR, 0)]);
        drv.process();
        assert_eq!(drv.pop_used().map(|u| u.0), Some(u32::from(head)));
        (drv.status_byte(st), 0)
    };
    assert_eq!(status, IOERR);
    // Readable status: no usable status byte, dropped.
    let st = DATA - 16;
    drv.mem.write_obj(0x77u8, GuestAddress(st)).unwrap();
    let head = drv.submit(0, &[D(DATA - PAGE, 16, R, 0), D(st, 1, R, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 0)));
    assert_eq!(drv.status_byte(st), 0x77);
    // Zero-length status descriptor.
    let head = drv.submit(0, &[D(DATA - PAGE, 16, R, 0), D(st, 0, WR, 0)]);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 0)));
    assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);
}

#[test]
fn descriptor_loop_is_dropped() {
    let mut drv = Driver::new(8 * 512, false, 16);
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    drv.write_desc(DESC_TABLE, 0, D(DATA, 16, R | NEXT, 1));
    drv.write_desc(DESC_TABLE, 1, D(DATA + PAGE, 512, WR | NEXT, 2));
    drv.write_desc(DESC_TABLE, 2, D(DATA + 2 * PAGE, 1, WR | NEXT, 0));
    drv.make_available(0);
    // A self loop too.
    drv.write_desc(DESC_TABLE, 5, D(DATA, 16, R | NEXT, 5));
    drv.make_available(5);
    drv.process();
    assert_eq!(drv.pop_used(), Some((0, 0)));
    assert_eq!(drv.pop_used(), Some((5, 0)));
    assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn next_out_of_the_table_is_dropped() {
    let mut drv = Driver::new(8 * 512, false, 16);
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    drv.write_desc(DESC_TABLE, 0, D(DATA, 16, R | NEXT, 200));
    drv.make_available(0);
    drv.process();
    assert_eq!(drv.pop_used(), Some((0, 0)));
}

#[test]
fn over_long_indirect_chain_is_dropped() {
    // VIRTIO_F_INDIRECT_DESC is not offered, but a hostile driver may use it anyway: an
    // indirect table longer than the queue is refused without following it to its end.
    let mut drv = Driver::new(16 * 512, false, 16);
    let table = DATA + 4 * PAGE;
    let n: u16 = 64;
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    drv.write_desc(table, 0, D(DATA, 16, R | NEXT, 1));
    for i in 1..n - 1 {
        drv.write_desc(table, i, D(DATA + PAGE, 512, WR | NEXT, i + 1));
    }
    drv.write_desc(table, n - 1, D(DATA + 2 * PAGE, 1, WR, 0));
    drv.write_desc(
        DESC_TABLE,
        0,
        D(table, u32::from(n) * 16, VRING_DESC_F_INDIRECT as u16, 0),
    );
    drv.make_available(0);
    drv.process();
    assert_eq!(drv.pop_used(), Some((0, 0)));
    assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);

    // A chain that uses the whole (direct) table is fine.
    let mut chain = vec![D(DATA, 16, R, 0)];
    chain.extend((0..14).map(|i| D(DATA + PAGE + i * 512, 512, WR, 0)));
    chain.push(D(DATA - 16, 1, WR, 0));
    assert_eq!(chain.len(), 16);
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    let head = drv.submit(0, &chain);
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 14 * 512 + 1)));
    assert_eq!(drv.status_byte(DATA - 16), OK);
}

#[test]
fn huge_lengths_do_not_overflow() {
    let mut drv = Driver::new(8 * 512, false, 16);
    // Total length over 4 GiB: the chain iterator stops, the request is dropped.
    drv.header(DATA, VIRTIO_BLK_T_IN, 0);
    let head = drv.submit(
        0,
        &[
            D(DATA, 16, R, 0),
            D(DATA + PAGE, u32::MAX, WR, 0),
            D(DATA + PAGE, u32::MAX, WR, 0),
            D(DATA - 16, 1, WR, 0),
        ],
    );
    drv.process();
    assert_eq!(drv.pop_used(), Some((u32::from(head), 0)));
    // A buffer of almost 4 GiB: outside memory, IOERR.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, u32::MAX - 100, WR, 0)]);
    assert_eq!(status, IOERR);
}

#[test]
fn corrupt_rings_set_needs_reset() {
    // An available index more than a queue ahead.
    let mut drv = Driver::new(8 * 512, false, 16);
    drv.mem
        .write_obj(100u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    drv.process();
    assert_ne!(drv.status() & STATUS_NEEDS_RESET, 0);
    let mut isr = [0u8; 4];
    drv.transport
        .read(VIRTIO_MMIO_INTERRUPT_STATUS.into(), &mut isr);
    assert_ne!(u32::from_le_bytes(isr) & 2, 0);
    // Further notifications are ignored until the driver resets the device.
    drv.process();
    assert_eq!(drv.used_idx(), 0);
    w(&mut drv.transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(drv.status(), 0);
    assert!(!drv.block.lock().unwrap().is_active());

    // A head index beyond the queue: nothing can be returned for it.
    let mut drv = Driver::new(8 * 512, false, 16);
    drv.make_available(300);
    drv.process();
    assert_ne!(drv.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn deferred_write_is_resubmitted_after_a_kick() {
    let mut drv = Driver::new(8 * 512, false, 16);
    drv.disk.would_block.store(true, Ordering::SeqCst);
    drv.header(DATA - PAGE, VIRTIO_BLK_T_OUT, 1);
    drv.mem.write_slice(&[9; 512], GuestAddress(DATA)).unwrap();
    drv.submit(
        0,
        &[
            D(DATA - PAGE, 16, R, 0),
            D(DATA, 512, R, 0),
            D(DATA - 16, 1, WR, 0),
        ],
    );
    drv.process();
    assert_eq!(drv.used_idx(), 0);
    assert!(drv.block.lock().unwrap().state().deferred);
    // Notifications do not retry while deferred.
    drv.process();
    assert_eq!(drv.used_idx(), 0);

    drv.disk.would_block.store(false, Ordering::SeqCst);
    let mut ops = Vec::new();
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(drv.block.clone());
    drv.block.lock().unwrap().kick_evt().write(1).unwrap();
    ops.push(em.run_with_timeout(1000).unwrap());
    assert_eq!(drv.pop_used(), Some((0, 1)));
    assert_eq!(drv.status_byte(DATA - 16), OK);
    assert_eq!(drv.disk.inner.lock().unwrap().data[512], 9);
}

/// A write larger than the backend can ever take fails at once (IOERR) without
/// touching the disk and without deferring the queue; one that fits goes through.
#[test]
fn a_write_larger_than_the_backend_takes_fails_instead_of_waiting() {
    let mut drv = Driver::new(64 * 512, false, 16);
    drv.disk.max_write.store(4 * 512, Ordering::SeqCst);
    drv.mem
        .write_slice(&[7; 8 * 512], GuestAddress(DATA))
        .unwrap();
    let ops = drv.disk.ops.load(Ordering::SeqCst);
    let (status, len) = drv.request(VIRTIO_BLK_T_OUT, 2, &[D(DATA, 8 * 512, R, 0)]);
    assert_eq!((status, len), (IOERR, 1));
    assert_eq!(
        drv.disk.ops.load(Ordering::SeqCst),
        ops,
        "the disk was touched"
    );
    assert!(!drv.block.lock().unwrap().state().deferred);
    let (status, _) = drv.request(VIRTIO_BLK_T_OUT, 2, &[D(DATA, 4 * 512, R, 0)]);
    assert_eq!(status, OK);
    assert_eq!(drv.disk.inner.lock().unwrap().data[2 * 512], 7);
    // Reads of any size are not limited.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[D(DATA, 8 * 512, WR, 0)]);
    assert_eq!(status, OK);
}

#[test]
fn event_loop_processes_notifications_and_raises_the_interrupt() {
    let mut drv = Driver::new(8 * 512, false, 16);
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(drv.block.clone());
    // Activation signalled the queue: the loop sees an (empty) queue.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(drv.used_idx(), 0);

    drv.header(DATA - PAGE, VIRTIO_BLK_T_IN, 3);
    drv.submit(
        0,
        &[
            D(DATA - PAGE, 16, R, 0),
            D(DATA, 512, WR, 0),
            D(DATA - 16, 1, WR, 0),
        ],
    );
    // The guest's notify reaches the transport (no ioeventfd in this test).
    w(&mut drv.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(drv.pop_used(), Some((0, 513)));
    assert_eq!(drv.transport.interrupt_evt().read().unwrap(), 1);
    let mut isr = [0u8; 4];
    drv.transport
        .read(VIRTIO_MMIO_INTERRUPT_STATUS.into(), &mut isr);
    assert_eq!(u32::from_le_bytes(isr), 1);
    w(&mut drv.transport, VIRTIO_MMIO_INTERRUPT_ACK, 1);

    // Through the duplicated eventfd, as a KVM ioeventfd would.
    let evts = drv.transport.queue_events().unwrap();
    assert_eq!(evts.len(), 1);
    drv.submit(
        0,
        &[
            D(DATA - PAGE, 16, R, 0),
            D(DATA, 512, WR, 0),
            D(DATA - 16, 1, WR, 0),
        ],
    );
    evts[0].1.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(drv.pop_used(), Some((0, 513)));

    // After a reset, notifications are drained and ignored; the re-activation picks up
    // what the driver queued meanwhile.
    w(&mut drv.transport, VIRTIO_MMIO_STATUS, 0);
    evts[0].1.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn notification_before_activation_is_not_lost() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = MemDisk::new(8 * 512);
    let block = Arc::new(Mutex::new(
        Block::new(Box::new(disk.clone()), false, b"x").unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());
    let mut t = MmioTransport::new(block.clone(), mem.clone()).unwrap();
    // An early notify, handled while the device is inactive.
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    // The driver queues a request, then activates.
    let mut drv = Driver {
        mem,
        transport: t,
        block,
        disk,
        queue_size: 16,
        avail_idx: 0,
        used_seen: 0,
    };
    drv.header(DATA - PAGE, VIRTIO_BLK_T_FLUSH, 0);
    drv.submit(0, &[D(DATA - PAGE, 16, R, 0), D(DATA - 16, 1, WR, 0)]);
    let t = &mut drv.transport;
    w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    w(t, VIRTIO_MMIO_QUEUE_NUM, 16);
    w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE as u32);
    w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
    w(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(drv.pop_used(), Some((0, 1)));
    assert_eq!(drv.disk.inner.lock().unwrap().flushes, 1);
}

#[test]
fn many_requests_wrap_the_rings() {
    let mut drv = Driver::new(64 * 512, false, 4);
    for i in 0..40u64 {
        let (status, len) = drv.request(VIRTIO_BLK_T_IN, i % 64, &[D(DATA, 512, WR, 0)]);
        assert_eq!((status, len), (OK, 513));
        assert_eq!(drv.status_byte(DATA), (i % 64) as u8);
    }
}

#[test]
fn several_requests_in_one_pass() {
    let mut drv = Driver::new(64 * 512, false, 8);
    for k in 0..4u16 {
        let hdr = DATA - PAGE + u64::from(k) * 16;
        drv.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
        drv.write_desc(DESC_TABLE, 2 * k, D(hdr, 16, R | NEXT, 2 * k + 1));
        drv.write_desc(DESC_TABLE, 2 * k + 1, D(DATA - 64 + u64::from(k), 1, WR, 0));
        drv.make_available(2 * k);
    }
    drv.process();
    for k in 0..4u16 {
        assert_eq!(drv.pop_used(), Some((u32::from(2 * k), 1)));
        assert_eq!(drv.status_byte(DATA - 64 + u64::from(k)), OK);
    }
    assert_eq!(drv.pop_used(), None);
    assert_eq!(drv.disk.inner.lock().unwrap().flushes, 4);
}

#[test]
fn raw_file_backend() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, &[7u8; 4096]).unwrap();
    let mut disk = RawFile::open(f.path(), false).unwrap();
    assert_eq!(disk.len(), 4096);
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 512).unwrap();
    assert_eq!(buf, [7; 512]);
    disk.write_at(&[1; 512], 1024).unwrap();
    disk.flush().unwrap();
    disk.read_at(&mut buf, 1024).unwrap();
    assert_eq!(buf, [1; 512]);
    assert!(disk.read_at(&mut buf, 4000).is_err());

    let mut ro = RawFile::open(f.path(), true).unwrap();
    assert!(ro.write_at(&[1; 512], 0).is_err());
    assert!(matches!(
        RawFile::open(Path::new("/nonexistent/disk.img"), false),
        Err(BlockError::Open { .. })
    ));
    let id = id_from_path(Path::new("/images/a-very-long-disk-image-name.img"));
    assert_eq!(id.len(), 20);
    assert_eq!(&id, b"-disk-image-name.img");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// Two RAM regions with a hole between them, to catch buffers spanning the hole.
    const LOW_END: u64 = 0x8_0000;
    const HIGH: u64 = 0x10_0000;
    const HIGH_END: u64 = 0x18_0000;
    const DISK_LEN: usize = 32 * 512;
    const QSIZE: u16 = 16;
    const FLAG_BITS: u16 = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;

    /// Addresses where interesting things happen.
    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0x8000u64),
            Just(0x9000),
            Just(0x10000),
            Just(LOW_END - 16),
            Just(LOW_END - 1),
            Just(LOW_END),
            Just(HIGH),
            Just(HIGH_END - 512),
            Just(HIGH_END),
            Just(DESC_TABLE),
            Just(USED_RING),
            Just(u64::MAX - 8),
            any::<u64>(),
            0x8000u64..0x9100,
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(16),
            Just(17),
            Just(512),
            Just(528),
            Just(1024),
            Just(u32::from(QSIZE) * 16),
            Just(u32::MAX),
            any::<u32>(),
            0u32..2048,
        ]
    }

    fn desc() -> impl Strategy<Value = D> {
        (
            addr(),
            len(),
            any::<u16>(),
            prop_oneof![0u16..QSIZE + 2, any::<u16>()],
        )
            .prop_map(|(a, l, f, n)| D(a, l, f & FLAG_BITS, n))
    }

    fn header() -> impl Strategy<Value = (u32, u64)> {
        (
            prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()],
            prop_oneof![
                0u64..40,
                Just((DISK_LEN / 512) as u64),
                Just(u64::MAX),
                any::<u64>()
            ],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn hostile_queues_never_panic_and_work_is_bounded(
            descs in proptest::collection::vec(desc(), QSIZE as usize),
            heads in proptest::collection::vec(prop_oneof![0u16..QSIZE, any::<u16>()], 0..=QSIZE as usize),
            avail_idx in prop_oneof![Just(None), any::<u16>().prop_map(Some)],
            headers in proptest::collection::vec(header(), 3),
            read_only in any::<bool>(),
            rounds in 1usize..4,
        ) {
            let mem = GuestMemory::from_ranges(&[
                (GuestAddress(0), LOW_END as usize),
                (GuestAddress(HIGH), (HIGH_END - HIGH) as usize),
            ])
            .unwrap();
            let mut drv = Driver::with_memory(mem, DISK_LEN, read_only, QSIZE);
            for (at, (t, sector)) in [0x8000u64, 0x9000, HIGH].into_iter().zip(&headers) {
                drv.header(at, *t, *sector);
            }
            // An indirect table somewhere useful, made of the same random descriptors.
            for (i, d) in descs.iter().enumerate() {
                drv.write_desc(DESC_TABLE, i as u16, *d);
                drv.write_desc(0x10000, i as u16, *d);
            }
            for &h in &heads {
                drv.make_available(h);
            }
            if let Some(idx) = avail_idx {
                drv.mem.write_obj(idx, GuestAddress(AVAIL_RING + 2)).unwrap();
            }
            for _ in 0..rounds {
                drv.process();
            }
            // Bounded: no more completions than requests offered, no more disk traffic
            // than every request touching the whole disk.
            let completed = drv.used_idx();
            prop_assert!(usize::from(completed) <= heads.len().max(usize::from(QSIZE)));
            let d = drv.disk.inner.lock().unwrap();
            prop_assert!(d.bytes <= heads.len() * DISK_LEN);
            prop_assert_eq!(d.data.len(), DISK_LEN);
            if read_only {
                prop_assert!(d.data.iter().enumerate().all(|(i, &b)| b == (i / 512) as u8));
            }
            drop(d);
            // Every completion names a head the driver offered, with a sane length.
            for _ in 0..completed {
                let (id, len) = drv.pop_used().unwrap();
                // With a forged available index the device may also see heads the
                // driver never wrote (zeroed ring slots).
                prop_assert!(heads.contains(&(id as u16)) || (avail_idx.is_some() && id < u32::from(QSIZE)));
                prop_assert!(u64::from(len) <= u64::from(u32::MAX));
            }
            // The device either still works or asks for a reset; a reset always recovers.
            w(&mut drv.transport, VIRTIO_MMIO_STATUS, 0);
            prop_assert_eq!(drv.status(), 0);
        }

        #[test]
        fn plausible_requests_behave(
            reqs in proptest::collection::vec(
                (
                    header(),
                    proptest::collection::vec(
                        (prop_oneof![Just(512u32), Just(1024), 0u32..2048], any::<bool>(), 0u64..8),
                        0..6,
                    ),
                    any::<bool>(),
                ),
                1..=8,
            ),
            read_only in any::<bool>(),
        ) {
            let mut drv = Driver::new(DISK_LEN, read_only, QSIZE);
            let mut next_desc = 0u16;
            let mut expected = Vec::new();
            for (k, ((t, sector), data, status_writable)) in reqs.iter().enumerate() {
                let hdr = DATA - PAGE + k as u64 * 16;
                let status = DATA - 64 + k as u64;
                drv.header(hdr, *t, *sector);
                drv.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
                let mut chain = vec![D(hdr, 16, R, 0)];
                for (l, writable, page) in data {
                    chain.push(D(DATA + page * 0x1000, *l, if *writable { WR } else { R }, 0));
                }
                chain.push(D(status, 1, if *status_writable { WR } else { R }, 0));
                if usize::from(next_desc) + chain.len() > usize::from(QSIZE) {
                    break;
                }
                let head = drv.submit(next_desc, &chain);
                next_desc += chain.len() as u16;
                expected.push((head, *t, data.clone(), *status_writable, status, *sector));
            }
            drv.process();
            for (head, t, data, status_writable, status, sector) in expected {
                let (id, len) = drv.pop_used().unwrap();
                prop_assert_eq!(id, u32::from(head));
                let st = drv.status_byte(status);
                if !status_writable {
                    prop_assert_eq!(len, 0);
                    prop_assert_eq!(st, 0xff);
                    continue;
                }
                let in_len: u64 = data.iter().filter(|d| !d.1).map(|d| u64::from(d.0)).sum();
                let out_len: u64 = data.iter().filter(|d| d.1).map(|d| u64::from(d.0)).sum();
                let ordered = data.windows(2).all(|w| !w[0].1 || w[1].1);
                let fits = |n: u64| n & 511 == 0
                    && sector.checked_mul(512).and_then(|o| o.checked_add(n)).is_some_and(|e| e <= DISK_LEN as u64);
                let want = match t {
                    _ if !ordered => IOERR,
                    VIRTIO_BLK_T_IN if in_len == 0 && fits(out_len) => OK,
                    VIRTIO_BLK_T_OUT if out_len == 0 && !read_only && fits(in_len) => OK,
                    VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => IOERR,
                    VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID => OK,
                    _ => UNSUPP,
                };
                prop_assert_eq!(st, want, "type {} sector {} data {:?}", t, sector, data);
                // Used length: every device-writable byte on success, only the status
                // byte after a failure.
                let want_len = if want == OK { out_len + 1 } else { 1 };
                prop_assert_eq!(u64::from(len), want_len);
            }
            prop_assert_eq!(drv.pop_used(), None);
            prop_assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
        }
    }
}

/// The wiring the VMM does, end to end: the transport on an MMIO bus, the block device
/// in an event manager of trait objects, the driver talking through the bus.
#[test]
fn vmm_wiring() {
    use crate::bus::Bus;
    use event_manager::MutEventSubscriber;

    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = MemDisk::new(8 * 512);
    let block = Arc::new(Mutex::new(
        Block::new(Box::new(disk.clone()), false, b"wired").unwrap(),
    ));
    let transport = MmioTransport::new(block.clone(), mem.clone()).unwrap();
    let ioevents = transport.queue_events().unwrap();
    let irq = transport.interrupt_evt().try_clone().unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let base = 0xd000_0000;
    let mut mmio = Bus::new();
    mmio.insert(transport.clone(), base, crate::virtio::mmio::MMIO_LEN)
        .unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(block.clone());

    let wr = |off: u32, v: u32| assert!(mmio.write(base + u64::from(off), &v.to_le_bytes()));
    let rd = |off: u32| {
        let mut b = [0u8; 4];
        assert!(mmio.read(base + u64::from(off), &mut b));
        u32::from_le_bytes(b)
    };
    assert_eq!(rd(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(VIRTIO_MMIO_DEVICE_ID), 2);
    wr(VIRTIO_MMIO_STATUS, 0);
    wr(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    wr(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(
        VIRTIO_MMIO_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    wr(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(VIRTIO_MMIO_QUEUE_READY), 0);
    wr(VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE as u32);
    wr(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
    wr(VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
    wr(VIRTIO_MMIO_QUEUE_READY, 1);
    wr(
        VIRTIO_MMIO_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    // The activation kick.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    let mut drv = Driver {
        mem,
        transport: MmioTransport::new(
            Arc::new(Mutex::new(
                Block::new(Box::new(MemDisk::new(512)), false, b"").unwrap(),
            )),
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        )
        .unwrap(),
        block,
        disk,
        queue_size: 16,
        avail_idx: 0,
        used_seen: 0,
    };
    drv.header(DATA - PAGE, VIRTIO_BLK_T_GET_ID, 0);
    drv.submit(
        0,
        &[
            D(DATA - PAGE, 16, R, 0),
            D(DATA, 20, WR, 0),
            D(DATA - 16, 1, WR, 0),
        ],
    );
    // What KVM does on the guest's notify write when the ioeventfd matches.
    assert_eq!(ioevents[0].0, 0);
    ioevents[0].1.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(drv.pop_used(), Some((0, 21)));
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    wr(VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(rd(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    let mut id = [0u8; 5];
    drv.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"wired");
}

/// Save and restore: the cut, the state through postcard, a restore on a copy of guest
/// memory, and the device continuing there.
mod snapshot {
    use super::*;
    use crate::snapshot::Snapshot;
    use crate::virtio::mmio::MmioTransportState;
    use crate::virtio::{StateError, VirtqueueState, INT_USED_RING};
    use vm_memory::GuestMemoryBackend;

    const HDRS: u64 = DATA - PAGE;
    const STATUSES: u64 = DATA - 64;
    const ID: &[u8] = b"mirrorvm-test-disk-0123";

    /// A new guest memory with the same layout and contents (what a restore builds from a
    /// checkpoint's memory image).
    pub(in super::super) fn copy_memory(mem: &GuestMemory) -> GuestMemory {
        let ranges: Vec<(GuestAddress, usize)> = mem
            .iter()
            .map(|r| (r.start_addr(), r.len() as usize))
            .collect();
        let copy = GuestMemory::from_ranges(&ranges).unwrap();
        for &(addr, len) in &ranges {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, addr).unwrap();
            copy.write_slice(&buf, addr).unwrap();
        }
        copy
    }

    /// A new disk holding what `disk` holds now.
    fn copy_disk(disk: &MemDisk) -> MemDisk {
        let copy = MemDisk::default();
        copy.inner.lock().unwrap().data = disk.inner.lock().unwrap().data.clone();
        copy
    }

    /// Request `k`: descriptors 3k..3k+2 (header, 512 bytes of data at page k, status).
    /// A write carries 512 bytes of `0xa0 + k`. Returns the head.
    fn submit_request(drv: &mut Driver, k: u16, request_type: u32, sector: u64) -> u16 {
        let hdr = HDRS + u64::from(k) * 16;
        let data = DATA + u64::from(k) * PAGE;
        let status = STATUSES + u64::from(k);
        drv.header(hdr, request_type, sector);
        drv.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let dir = if request_type == VIRTIO_BLK_T_OUT {
            drv.mem
                .write_slice(&[0xa0 + k as u8; 512], GuestAddress(data))
                .unwrap();
            R
        } else {
            WR
        };
        drv.submit(
            3 * k,
            &[D(hdr, 16, R, 0), D(data, 512, dir, 0), D(status, 1, WR, 0)],
        )
    }

    /// Through postcard and back, as the checkpoint format carries them.
    fn through_postcard<T: serde::Serialize + serde::de::DeserializeOwned>(state: &T) -> T {
        let bytes = postcard::to_allocvec(state).unwrap();
        postcard::from_bytes(&bytes).unwrap()
    }

    /// Restores the device and transport of `drv` (saved as `block_state` and
    /// `transport_state`) on a copy of its memory and disk, as a driver that continues.
    fn restore(
        drv: &Driver,
        block_state: &BlockState,
        transport_state: &MmioTransportState,
        mem: GuestMemory,
        disk: MemDisk,
    ) -> Driver {
        let (block, transport) = restore_with_transport(
            Box::new(disk.clone()),
            false,
            ID,
            block_state,
            transport_state,
            mem.clone(),
        )
        .unwrap();
        Driver {
            mem,
            transport,
            block,
            disk,
            queue_size: drv.queue_size,
            avail_idx: drv.avail_idx,
            used_seen: drv.used_seen,
        }
    }

    #[test]
    fn restore_continues_the_queue_on_a_copy_of_memory() {
        let mut drv = Driver::new(64 * 512, false, 32);
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(drv.block.clone());
        assert_eq!(em.run_with_timeout(100).unwrap(), 1); // the activation kick

        // Three requests processed before the cut; their interrupt is not acknowledged.
        let mut heads = vec![
            submit_request(&mut drv, 0, VIRTIO_BLK_T_OUT, 10),
            submit_request(&mut drv, 1, VIRTIO_BLK_T_OUT, 11),
            submit_request(&mut drv, 2, VIRTIO_BLK_T_IN, 12),
        ];
        w(&mut drv.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(drv.used_idx(), 3);
        assert_eq!(drv.transport.interrupt_evt().read().unwrap(), 1);

        // The disk region is full: the next write is deferred, and two more requests
        // wait behind it, one of them notified (the ioeventfd count is pending).
        drv.disk.would_block.store(true, Ordering::SeqCst);
        heads.push(submit_request(&mut drv, 3, VIRTIO_BLK_T_OUT, 13));
        w(&mut drv.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert!(drv.block.lock().unwrap().state().deferred);
        heads.push(submit_request(&mut drv, 4, VIRTIO_BLK_T_OUT, 14));
        heads.push(submit_request(&mut drv, 5, VIRTIO_BLK_T_IN, 10));
        w(&mut drv.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        // The cut: drain and process what is pending (the deferral holds: no kick, so
        // the backend is not asked again), then save.
        let ops = drv.disk.ops.load(Ordering::SeqCst);
        drv.block.lock().unwrap().process_pending();
        assert_eq!(drv.disk.ops.load(Ordering::SeqCst), ops);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "notifications drained");
        let block_state = drv.block.lock().unwrap().snapshot();
        let transport_state = drv.transport.snapshot();
        assert!(block_state.deferred);
        let active = block_state.active.as_ref().unwrap();
        assert_eq!(
            (active.queue.0.next_avail, active.queue.0.next_used),
            (3, 3)
        );
        assert_eq!(transport_state.interrupt.status, INT_USED_RING);
        let mem = copy_memory(&drv.mem);
        let disk = copy_disk(&drv.disk);

        // A fresh device on the copies, from the states as decoded from a checkpoint.
        let block_state = through_postcard(&block_state);
        let transport_state = through_postcard(&transport_state);
        let mut new = restore(&drv, &block_state, &transport_state, mem, disk);
        let restored = new.block.lock().unwrap().state();
        assert_eq!(
            restored,
            BlockState {
                deferred: false,
                ..block_state.clone()
            }
        );
        assert_eq!(new.transport.state(), transport_state);
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(new.block.clone());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "nothing signalled yet");

        // post_restore: the interrupt again, and the queue looked at again.
        new.transport.post_restore();
        assert_eq!(new.transport.interrupt_evt().read().unwrap(), 1);
        assert_eq!(r(&mut new.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

        // Every request completed exactly once, the used ring continuing where it was.
        assert_eq!(new.used_idx(), 6);
        let mut used = Vec::new();
        new.used_seen = 0;
        while let Some((id, len)) = new.pop_used() {
            used.push((id, len));
        }
        let expected: Vec<(u32, u32)> = heads
            .iter()
            .zip([1, 1, 513, 1, 1, 513])
            .map(|(&h, len)| (u32::from(h), len))
            .collect();
        assert_eq!(used, expected);
        for k in 0..6 {
            assert_eq!(new.status_byte(STATUSES + k), OK, "request {k}");
        }
        assert_eq!(new.transport.interrupt_evt().read().unwrap(), 1);

        // The disk: each write once, on the restored disk only.
        assert_eq!(*new.disk.write_sizes.lock().unwrap(), vec![512, 512]);
        {
            let d = new.disk.inner.lock().unwrap();
            for (sector, byte) in [(10, 0xa0), (11, 0xa1), (13, 0xa3), (14, 0xa4)] {
                assert!(
                    d.data[sector * 512..(sector + 1) * 512]
                        .iter()
                        .all(|&b| b == byte),
                    "sector {sector}"
                );
            }
            assert_eq!(d.data[12 * 512], 12);
        }
        assert_eq!(drv.disk.inner.lock().unwrap().data[13 * 512], 13);
        // The reads landed in the restored guest's memory, not the old one.
        let mut buf = [0u8; 512];
        new.mem
            .read_slice(&mut buf, GuestAddress(DATA + 2 * PAGE))
            .unwrap();
        assert_eq!(buf, [12; 512]);
        new.mem
            .read_slice(&mut buf, GuestAddress(DATA + 5 * PAGE))
            .unwrap();
        assert_eq!(buf, [0xa0; 512]);
        assert!(new.is_dirty(USED_RING));
        assert_eq!(drv.used_idx(), 3);

        // And the driver goes on: ack, one more request through the notify register.
        w(&mut new.transport, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut new.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        let head = submit_request(&mut new, 0, VIRTIO_BLK_T_OUT, 20);
        w(&mut new.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(new.pop_used(), Some((u32::from(head), 1)));
        assert_eq!(new.used_idx(), 7);
        assert_eq!(new.disk.inner.lock().unwrap().data[20 * 512], 0xa0);
    }

    #[test]
    fn restore_with_wrapped_ring_indices() {
        let mut drv = Driver::new(64 * 512, false, 4);
        for i in 0..10u64 {
            assert_eq!(
                drv.request(VIRTIO_BLK_T_IN, i, &[D(DATA, 512, WR, 0)]),
                (OK, 513)
            );
        }
        // One request available, not processed, no notification pending.
        drv.header(DATA - PAGE, VIRTIO_BLK_T_IN, 33);
        let head = drv.submit(
            0,
            &[
                D(DATA - PAGE, 16, R, 0),
                D(DATA, 512, WR, 0),
                D(DATA - 16, 1, WR, 0),
            ],
        );
        let block_state = through_postcard(&drv.block.lock().unwrap().snapshot());
        let transport_state = through_postcard(&drv.transport.snapshot());
        let q = block_state.active.as_ref().unwrap().queue.0;
        assert_eq!((q.size, q.next_avail, q.next_used), (4, 10, 10));
        let mem = copy_memory(&drv.mem);
        let mut new = restore(
            &drv,
            &block_state,
            &transport_state,
            mem,
            copy_disk(&drv.disk),
        );
        new.transport.post_restore();
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(new.block.clone());
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(new.pop_used(), Some((u32::from(head), 513)));
        assert_eq!(new.used_idx(), 11);
        assert_eq!(new.status_byte(DATA), 33);
    }

    #[test]
    fn process_pending_at_the_cut() {
        let mut drv = Driver::new(64 * 512, false, 16);
        let evts = drv.transport.queue_events().unwrap();
        // Nothing pending: nothing happens, nothing is touched.
        drv.block.lock().unwrap().process_pending();
        assert_eq!(drv.used_idx(), 0);
        assert_eq!(drv.disk.ops.load(Ordering::SeqCst), 0);

        // A notification KVM delivered to the ioeventfd: drained and processed.
        submit_request(&mut drv, 0, VIRTIO_BLK_T_OUT, 1);
        evts[0].1.write(1).unwrap();
        drv.block.lock().unwrap().process_pending();
        assert!(evts[0].1.read().is_err(), "drained");
        assert_eq!(drv.pop_used(), Some((0, 1)));

        // Deferred: stays deferred without a kick, retried after one.
        drv.disk.would_block.store(true, Ordering::SeqCst);
        submit_request(&mut drv, 1, VIRTIO_BLK_T_OUT, 2);
        drv.block.lock().unwrap().process_pending();
        assert!(drv.block.lock().unwrap().state().deferred);
        let ops = drv.disk.ops.load(Ordering::SeqCst);
        drv.block.lock().unwrap().process_pending();
        assert_eq!(drv.disk.ops.load(Ordering::SeqCst), ops);
        drv.disk.would_block.store(false, Ordering::SeqCst);
        drv.block.lock().unwrap().kick_evt().write(1).unwrap();
        drv.block.lock().unwrap().process_pending();
        assert!(!drv.block.lock().unwrap().state().deferred);
        assert_eq!(drv.pop_used(), Some((3, 1)));
        assert_eq!(drv.disk.inner.lock().unwrap().data[2 * 512], 0xa1);
    }

    #[test]
    fn inactive_and_broken_devices_round_trip() {
        // Mid-handshake: FEATURES_OK, the queue half configured, the device inactive.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = MemDisk::new(8 * 512);
        let block = Arc::new(Mutex::new(
            Block::new(Box::new(disk.clone()), false, ID).unwrap(),
        ));
        let mut t = MmioTransport::new(block.clone(), mem.clone()).unwrap();
        w(&mut t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE as u32);
        let block_state = through_postcard(&block.lock().unwrap().snapshot());
        let transport_state = through_postcard(&t.snapshot());
        assert_eq!(block_state.active, None);
        let mem2 = copy_memory(&mem);
        let disk2 = copy_disk(&disk);
        let (block2, mut t2) = restore_with_transport(
            Box::new(disk2.clone()),
            false,
            ID,
            &block_state,
            &transport_state,
            mem2.clone(),
        )
        .unwrap();
        assert_eq!(t2.state(), transport_state);
        let evts = t2.queue_events().unwrap();
        t2.post_restore();
        assert!(evts[0].1.read().is_err(), "inactive: no queue kick");
        assert!(t2.interrupt_evt().read().is_err(), "no interrupt pending");
        // The driver finishes the handshake on the restored transport.
        let t = &mut t2;
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(block2.lock().unwrap().is_active());
        let mut drv = Driver {
            mem: mem2,
            transport: t2,
            block: block2,
            disk: disk2,
            queue_size: 16,
            avail_idx: 0,
            used_seen: 0,
        };
        assert_eq!(
            drv.request(VIRTIO_BLK_T_GET_ID, 0, &[D(DATA, 20, WR, 0)]),
            (OK, 21)
        );

        // A device that needs a reset stays so, and a reset recovers it.
        let mut drv = Driver::new(8 * 512, false, 16);
        drv.mem
            .write_obj(100u16, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        drv.process();
        assert_ne!(drv.status() & STATUS_NEEDS_RESET, 0);
        let block_state = through_postcard(&drv.block.lock().unwrap().snapshot());
        let transport_state = through_postcard(&drv.transport.snapshot());
        let mut new = restore(
            &drv,
            &block_state,
            &transport_state,
            copy_memory(&drv.mem),
            copy_disk(&drv.disk),
        );
        assert_ne!(new.status() & STATUS_NEEDS_RESET, 0);
        new.transport.post_restore();
        assert_eq!(new.transport.interrupt_evt().read().unwrap(), 1);
        new.process();
        assert_eq!(new.used_idx(), 0);
        w(&mut new.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(new.status(), 0);
        assert!(!new.block.lock().unwrap().is_active());
    }

    /// A valid saved pair (active device, one request done, interrupt pending).
    fn saved() -> (Driver, BlockState, MmioTransportState) {
        let mut drv = Driver::new(8 * 512, false, 16);
        assert_eq!(drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
        let b = drv.block.lock().unwrap().snapshot();
        let t = drv.transport.snapshot();
        (drv, b, t)
    }

    fn try_restore(
        drv: &Driver,
        b: &BlockState,
        t: &MmioTransportState,
        read_only: bool,
        disk_len: usize,
    ) -> Result<(Arc<Mutex<Block>>, MmioTransport), StateError> {
        restore_with_transport(
            Box::new(MemDisk::new(disk_len)),
            read_only,
            ID,
            b,
            t,
            drv.mem.clone(),
        )
    }

    #[test]
    fn hostile_states_are_refused() {
        let (drv, b, t) = saved();
        let ok = |b: &BlockState, t: &MmioTransportState| try_restore(&drv, b, t, false, 8 * 512);
        assert!(ok(&b, &t).is_ok());

        let with_queue = |f: &dyn Fn(&mut VirtqueueState)| {
            let mut b = b.clone();
            f(&mut b.active.as_mut().unwrap().queue);
            b
        };
        let cases: Vec<(BlockState, &str)> = vec![
            (with_queue(&|q| q.0.size = 3), "QueueSize"),
            (with_queue(&|q| q.0.size = 0), "QueueSize"),
            (with_queue(&|q| q.0.size = 512), "QueueSize"),
            (with_queue(&|q| q.0.max_size = 1024), "QueueMaxSize"),
            (with_queue(&|q| q.0.ready = false), "QueueNotReady"),
            (with_queue(&|q| q.0.desc_table += 8), "RingMisaligned"),
            (with_queue(&|q| q.0.avail_ring += 1), "RingMisaligned"),
            (with_queue(&|q| q.0.used_ring += 2), "RingMisaligned"),
            (
                with_queue(&|q| q.0.used_ring = MEM_SIZE as u64 - 16),
                "RingsOutsideMemory",
            ),
            (
                with_queue(&|q| q.0.desc_table = u64::MAX - 15),
                "RingsOutsideMemory",
            ),
            (with_queue(&|q| q.0.event_idx_enabled = true), "EventIdx"),
            (
                BlockState {
                    capacity: 9,
                    ..b.clone()
                },
                "Capacity",
            ),
            (
                BlockState {
                    device_features: 0,
                    ..b.clone()
                },
                "DeviceFeatures",
            ),
            (
                BlockState {
                    active: None,
                    deferred: true,
                    ..b.clone()
                },
                "DeferredInactive",
            ),
            (
                {
                    let mut b = b.clone();
                    b.active.as_mut().unwrap().acked_features |= 1 << 40;
                    b
                },
                "FeaturesRefused",
            ),
            (
                BlockState {
                    active: None,
                    ..b.clone()
                },
                "ActivationMismatch",
            ),
        ];
        for (bad, want) in cases {
            let e = ok(&bad, &t).expect_err(want);
            assert!(format!("{e:?}").starts_with(want), "{want}: got {e:?}");
            assert!(!e.to_string().is_empty());
        }

        let with_t = |f: &dyn Fn(&mut MmioTransportState)| {
            let mut t = t.clone();
            f(&mut t);
            t
        };
        let cases: Vec<(MmioTransportState, &str)> = vec![
            (with_t(&|t| t.interrupt.status = 4), "InterruptStatus"),
            (with_t(&|t| t.status |= STATUS_NEEDS_RESET), "StatusBits"),
            (with_t(&|t| t.status |= 0x100), "StatusBits"),
            (with_t(&|t| t.status &= !STATUS_FEATURES_OK), "StatusOrder"),
            (with_t(&|t| t.status = STATUS_DRIVER), "StatusOrder"),
            (with_t(&|t| t.driver_features |= 1 << 50), "FeaturesRefused"),
            (
                with_t(&|t| t.driver_features_beyond_64 = true),
                "FeaturesRefused",
            ),
            (with_t(&|t| t.device_type = 1), "DeviceType"),
            (with_t(&|t| t.device_features = 1), "DeviceFeatures"),
            (with_t(&|t| t.queues.clear()), "QueueCount"),
            (with_t(&|t| t.queues[0].max_size = 128), "QueueMaxSize"),
            (
                with_t(&|t| t.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER),
                "ActivationMismatch",
            ),
        ];
        for (bad, want) in cases {
            let e = ok(&b, &bad).expect_err(want);
            assert!(format!("{e:?}").starts_with(want), "{want}: got {e:?}");
        }

        // Restored with other options or onto another disk.
        assert!(matches!(
            try_restore(&drv, &b, &t, true, 8 * 512),
            Err(StateError::DeviceFeatures { .. })
        ));
        assert!(matches!(
            try_restore(&drv, &b, &t, false, 16 * 512),
            Err(StateError::Capacity { saved: 8, disk: 16 })
        ));
        // DRIVER_OK with DEVICE_NEEDS_RESET and an inactive device: a failed activation.
        let failed = with_t(&|t| t.interrupt.needs_reset = true);
        let inactive = BlockState {
            active: None,
            ..b.clone()
        };
        assert!(ok(&inactive, &failed).is_ok());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn mutate_queue() -> impl Strategy<Value = (u8, u64)> {
            (0u8..8, any::<u64>())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Random bytes into the decoders, then a restore: an error or a device, never
            /// a panic.
            #[test]
            fn random_bytes_never_panic(
                block_bytes in proptest::collection::vec(any::<u8>(), 0..96),
                transport_bytes in proptest::collection::vec(any::<u8>(), 0..160),
            ) {
                let (drv, b, t) = saved();
                let b = postcard::from_bytes::<BlockState>(&block_bytes).unwrap_or(b);
                let t = postcard::from_bytes::<MmioTransportState>(&transport_bytes).unwrap_or(t);
                if let Ok((block, transport)) = try_restore(&drv, &b, &t, false, 8 * 512) {
                    transport.post_restore();
                    block.lock().unwrap().process_pending();
                }
            }

            /// A valid state with fields set to random values: refused or restored; a
            /// restored device survives processing, post_restore and register traffic.
            #[test]
            fn mutated_states_never_panic(
                muts in proptest::collection::vec(mutate_queue(), 1..6),
                scribble in proptest::collection::vec((0u64..0x8000, any::<u64>()), 0..8),
                regs in proptest::collection::vec((0u32..0x40, any::<u32>()), 0..16),
            ) {
                let (drv, mut b, mut t) = saved();
                for (field, v) in muts {
                    let q = &mut b.active.as_mut().unwrap().queue.0;
                    match field {
                        0 => q.size = v as u16,
                        1 => q.desc_table = v,
                        2 => q.avail_ring = v & !1,
                        3 => q.used_ring = v & !3,
                        4 => q.next_avail = v as u16,
                        5 => q.next_used = v as u16,
                        6 => t.status = v as u32,
                        _ => t.interrupt.status = v as u32 & 3,
                    }
                }
                for (addr, v) in scribble {
                    drv.mem.write_obj(v, GuestAddress(addr & !7)).unwrap();
                }
                if let Ok((block, mut transport)) = try_restore(&drv, &b, &t, false, 8 * 512) {
                    let q = block.lock().unwrap().state().active.unwrap().queue.0;
                    prop_assert!(q.size.is_power_of_two() && q.size <= QUEUE_SIZE);
                    transport.post_restore();
                    block.lock().unwrap().process_pending();
                    for (reg, v) in regs {
                        transport.write(u64::from(reg * 4), &v.to_le_bytes());
                        block.lock().unwrap().process_queue();
                    }
                }
            }
        }
    }
}
