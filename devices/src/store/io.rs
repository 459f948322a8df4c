//! The file layer under the store: positional reads and writes, sync, length.
//!
//! Everything the store does to its two files goes through [`StoreFile`], so tests can
//! put a fault-injecting implementation underneath and the fuzz target an in-memory one.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// A file as the store uses it. Implementations must be usable from several threads
/// (a retire runs beside the device loop's writes to other offsets).
pub trait StoreFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write made so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the file's length (extending with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
}

impl StoreFile for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
}

/// An in-memory file: for tests, the fuzz target and tools that work on a copy.
#[derive(Debug, Default)]
pub struct MemFile {
    data: Mutex<Vec<u8>>,
}

impl MemFile {
    /// A memory file holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemFile {
            data: Mutex::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoreFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = data.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let start = usize::try_from(offset).map_err(|_| too_big())?;
        let end = start.checked_add(buf.len()).ok_or_else(too_big)?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| too_big())?;
        self.lock().resize(len, 0);
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

fn too_big() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset too large")
}

impl<T: StoreFile + ?Sized> StoreFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}
