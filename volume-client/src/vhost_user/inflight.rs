//! Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking"; split virtqueues): a
//! buffer the front end keeps for the back end (`VHOST_USER_GET_INFLIGHT_FD` creates it,
//! `VHOST_USER_SET_INFLIGHT_FD` hands it over again) in which every request taken from a ring
//! and not yet completed is marked, with the order it was taken in. After the back end dies
//! and a new one starts, the new one resubmits exactly those requests. Without it, the front
//! end rewinds the ring to the used index, which — since requests complete out of order —
//! forgets some requests and repeats others.
//!
//! Layout per queue, as the spec gives it (version 1), each queue's region 64-byte aligned:
//! `features: u64, version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16`, then per
//! descriptor `inflight: u8, padding: [u8; 5], next: u16, counter: u64`. The front end does not
//! read it; a region of another version or size is refused by name, never misread.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use thiserror::Error;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// The layout version written and accepted.
pub const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
/// Largest queue the area describes (the virtqueue maximum, §2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Why an inflight area could not be made or used.
#[derive(Debug, Error)]
pub enum InflightError {
    /// The front end asked for an area of no queues or an impossible queue size.
    #[error("inflight area for {queues} queues of {queue_size} descriptors: {reason}")]
    Shape {
        /// Queues asked for.
        queues: u16,
        /// Descriptors per queue asked for.
        queue_size: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The area handed back has another layout version.
    #[error("inflight area queue {queue} has layout version {found}; this build reads version {VERSION}")]
    Version {
        /// The queue whose header says so.
        queue: u16,
        /// The version found.
        found: u16,
    },
    /// The area handed back was made for another queue size.
    #[error("inflight area queue {queue} describes {found} descriptors, but the front end says {expected}")]
    QueueSize {
        /// The queue whose header says so.
        queue: u16,
        /// The size found.
        found: u16,
        /// The size the front end gave.
        expected: u16,
    },
    /// The area handed back is smaller than its queues need.
    #[error("inflight area of {size} bytes is too small for {queues} queues of {queue_size} descriptors")]
    TooSmall {
        /// Its size.
        size: u64,
        /// Queues.
        queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// Creating or mapping the buffer failed.
    #[error("inflight area: {0}")]
    Io(#[from] std::io::Error),
    /// Mapping the buffer failed.
    #[error("inflight area: cannot map it: {0}")]
    Map(String),
}

/// Bytes one queue's region takes.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A mapped inflight area.
pub struct InflightArea {
    region: MmapRegion,
    queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea").field("queues", &self.queues).field("queue_size", &self.queue_size).finish()
    }
}

impl InflightArea {
    /// A new zeroed area in a memfd for `queues` queues of `queue_size` descriptors, each
    /// queue's header written; the file to give the front end and its size.
    pub fn create(queues: u16, queue_size: u16) -> Result<(InflightArea, File, u64), InflightError> {
        let shape = |reason| InflightError::Shape { queues, queue_size, reason };
        if queues == 0 || queues > 1024 {
            return Err(shape("1 to 1024 queues"));
        }
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
            return Err(shape("a queue size is a power of 2 up to 32768"));
        }
        let size = (queue_region_size(queue_size) * usize::from(queues)) as u64;
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new
        // descriptor (or -1), which is then owned here alone.
        let fd = unsafe { libc::memfd_create(c"basalt-vhost-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)?;
        let area = InflightArea::map(file.try_clone()?, 0, size, queues, queue_size)?;
        for q in 0..queues {
            area.put(q, 8, VERSION);
            area.put(q, 10, queue_size);
        }
        Ok((area, file, size))
    }

    /// The area the front end hands back (`mmap_offset`, `mmap_size`), checked: every queue's
    /// region must be of this layout version and describe `queue_size` descriptors.
    pub fn open(file: File, offset: u64, size: u64, queues: u16, queue_size: u16) -> Result<InflightArea, InflightError> {
        if queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(InflightError::Shape { queues, queue_size, reason: "no queues, or an impossible queue size" });
        }
        if size < (queue_region_size(queue_size) * usize::from(queues)) as u64 {
            return Err(InflightError::TooSmall { size, queues, queue_size });
        }
        let area = InflightArea::map(file, offset, size, queues, queue_size)?;
        for q in 0..queues {
            let found: u16 = area.get(q, 8);
            if found != VERSION {
                return Err(InflightError::Version { queue: q, found });
            }
            let found: u16 = area.get(q, 10);
            if found != queue_size {
                return Err(InflightError::QueueSize { queue: q, found, expected: queue_size });
            }
        }
        Ok(area)
    }

    fn map(file: File, offset: u64, size: u64, queues: u16, queue_size: u16) -> Result<InflightArea, InflightError> {
        let len = usize::try_from(size).map_err(|_| InflightError::TooSmall { size, queues, queue_size })?;
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(InflightArea { region, queues, queue_size })
    }

    /// Queues described.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn at(&self, q: u16, field: usize) -> usize {
        usize::from(q) * queue_region_size(self.queue_size) + field
    }

    fn desc(&self, q: u16, head: u16, field: usize) -> usize {
        self.at(q, HEADER + DESC * usize::from(head) + field)
    }

    // Offsets are inside the mapping by construction (queue < queues, head < queue_size,
    // checked by callers), so these cannot fail; a failure would only lose tracking.
    fn put<T: vm_memory::ByteValued>(&self, q: u16, field: usize, v: T) {
        let _ = self.region.as_volatile_slice().write_obj(v, self.at(q, field));
    }

    fn get<T: vm_memory::ByteValued + Default>(&self, q: u16, field: usize) -> T {
        self.region.as_volatile_slice().read_obj(self.at(q, field)).unwrap_or_default()
    }

    fn covers(&self, q: u16, head: u16) -> bool {
        q < self.queues && head < self.queue_size
    }

    /// Request `head` of queue `q` was taken from the ring, the `counter`-th so far.
    pub fn begin(&self, q: u16, head: u16, counter: u64) {
        if !self.covers(q, head) {
            return;
        }
        let slice = self.region.as_volatile_slice();
        let _ = slice.write_obj(counter, self.desc(q, head, 8));
        let _ = slice.write_obj(1u8, self.desc(q, head, 0));
    }

    /// Request `head` of queue `q` is about to go into the used ring: if the back end dies
    /// before [`InflightArea::completed`], the next one compares the used index to tell.
    pub fn completing(&self, q: u16, head: u16) {
        if self.covers(q, head) {
            self.put(q, 12, head);
        }
    }

    /// Request `head` of queue `q` is in the used ring, whose index is now `used_idx`.
    pub fn completed(&self, q: u16, head: u16, used_idx: u16) {
        if !self.covers(q, head) {
            return;
        }
        let _ = self.region.as_volatile_slice().write_obj(0u8, self.desc(q, head, 0));
        self.put(q, 14, used_idx);
    }

    /// After a restart: the requests of queue `q` still in flight, oldest first, given the
    /// ring's used index in guest memory now; and the next counter to use. A request whose
    /// completion reached the used ring just before the back end died is no longer counted.
    pub fn recover(&self, q: u16, used_idx: u16) -> (Vec<u16>, u64) {
        if q >= self.queues {
            return (Vec::new(), 0);
        }
        let recorded: u16 = self.get(q, 14);
        if recorded != used_idx {
            let last: u16 = self.get(q, 12);
            if last < self.queue_size {
                let _ = self.region.as_volatile_slice().write_obj(0u8, self.desc(q, last, 0));
            }
            self.put(q, 14, used_idx);
        }
        let slice = self.region.as_volatile_slice();
        let mut inflight = Vec::new();
        let mut next = 0u64;
        for head in 0..self.queue_size {
            let counter: u64 = slice.read_obj(self.desc(q, head, 8)).unwrap_or(0);
            next = next.max(counter.saturating_add(1));
            if slice.read_obj::<u8>(self.desc(q, head, 0)).unwrap_or(0) == 1 {
                inflight.push((counter, head));
            }
        }
        inflight.sort_unstable();
        (inflight.into_iter().map(|(_, head)| head).collect(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_finds_what_was_in_flight_oldest_first() {
        let (area, file, size) = InflightArea::create(2, 8).unwrap();
        area.begin(1, 5, 10);
        area.begin(1, 2, 11);
        area.begin(1, 7, 12);
        area.completing(1, 2);
        area.completed(1, 2, 1);
        // Died between putting 7 into the used ring (index now 2) and clearing it.
        area.completing(1, 7);
        drop(area);
        let again = InflightArea::open(file, 0, size, 2, 8).unwrap();
        assert_eq!(again.recover(1, 2), (vec![5], 13));
        assert_eq!(again.recover(0, 0), (vec![], 1));
    }

    #[test]
    fn another_version_or_size_is_refused_by_name() {
        let (area, file, size) = InflightArea::create(1, 8).unwrap();
        area.put(0, 8, 7u16);
        let err = InflightArea::open(file.try_clone().unwrap(), 0, size, 1, 8).unwrap_err().to_string();
        assert!(err.contains("layout version 7") && err.contains("version 1"), "{err}");
        area.put(0, 8, VERSION);
        let err = InflightArea::open(file.try_clone().unwrap(), 0, size, 1, 4).unwrap_err().to_string();
        assert!(err.contains("describes 8 descriptors") && err.contains("says 4"), "{err}");
        let err = InflightArea::open(file, 0, 16, 1, 8).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
        assert!(InflightArea::create(1, 6).is_err());
        assert!(InflightArea::create(0, 8).is_err());
    }
}
