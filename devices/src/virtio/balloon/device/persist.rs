//! The balloon's own state for snapshot and migration (the transport saves the rest).
//!
//! Payload part, after the transport's:
//!
//! ```text
//! num_pages u32 | actual u32 | acked features u64
//! host page size u64 | partial page count u32
//!   per partial page: host address u64 | one u64 per 64 pieces (bit set: in the balloon)
//! statistics count u32 | per statistic: tag u16, value u64 | updates u64
//! stats buffer held u8 | its head u16
//! discarded u8
//! queue count u32 | per queue: present u8 | next_avail u16 | next_used u16
//! ```
//!
//! The counters ([`BalloonMetrics`](super::BalloonMetrics)) are the device's own and
//! are not part of the state.

use std::collections::BTreeMap;

use super::{Balloon, BalloonStats, HostPageTracker, Role};
use crate::persist::{PersistError, Reader, Writer};
use crate::virtio::balloon::{VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use crate::virtio::queue::Queue;
use crate::virtio::{in_ram, usize_of, RestoreContext};

/// Statistics tags are 16 bits: at most this many distinct ones.
const MAX_STATS: usize = 1 << 16;

/// The balloon's state decoded from a snapshot and checked; applied by the transport's
/// restore.
#[derive(Debug)]
pub struct BalloonState {
    active: bool,
    num_pages: u32,
    actual: u32,
    acked: u64,
    tracker: HostPageTracker,
    stats: BalloonStats,
    stats_head: Option<u16>,
    discarded: bool,
    /// `(next_avail, next_used)` of each queue, by index (`None`: not enabled).
    positions: Vec<Option<(u16, u16)>>,
}

/// The queue roles the driver's `acked` features give, by index.
fn roles_of(acked: u64) -> Vec<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if acked & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(Role::Stats);
    }
    if acked & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(Role::Reporting);
    }
    roles
}

impl Balloon {
    pub(super) fn save(&self, w: &mut Writer) -> Result<(), PersistError> {
        w.u32(self.num_pages);
        w.u32(self.actual);
        w.u64(self.acked);
        let t = &self.tracker;
        w.u64(t.page_size);
        w.count("partial host pages", t.partial.len(), u32::MAX as usize)?;
        for (&host, bits) in &t.partial {
            w.u64(host);
            for &word in bits {
                w.u64(word);
            }
        }
        w.count("statistics", self.stats.values.len(), MAX_STATS)?;
        for (&tag, &value) in &self.stats.values {
            w.u16(tag);
            w.u64(value);
        }
        w.u64(self.stats.updates);
        w.flag(self.stats_head.is_some());
        w.u16(self.stats_head.unwrap_or(0));
        w.flag(self.discarded);
        w.count("queues", self.queues.len(), self.queue_sizes.len())?;
        for q in &self.queues {
            w.flag(q.is_some());
            w.u16(q.as_ref().map_or(0, Queue::next_avail));
            w.u16(q.as_ref().map_or(0, Queue::next_used));
        }
        Ok(())
    }

    pub(super) fn decode(
        &self,
        r: &mut Reader<'_>,
        ctx: &RestoreContext<'_>,
    ) -> Result<BalloonState, PersistError> {
        let active = ctx.activated;
        let num_pages = r.u32("balloon target")?;
        let actual = r.u32("balloon actual pages")?;
        let acked = r.u64("balloon acked features")?;
        // Set at activation, cleared by reset.
        let expected = if active { ctx.acked_features } else { 0 };
        if acked != expected {
            return Err(PersistError::Mismatch {
                what: "balloon acked features",
                found: acked,
                expected,
            });
        }

        let page_size = r.u64("host page size")?;
        let mut tracker =
            HostPageTracker::new(page_size).map_err(|_| PersistError::Invalid("host page size"))?;
        if active {
            let expected = self.page_size_override.unwrap_or(ctx.ram.page_size());
            if page_size != expected {
                return Err(PersistError::Mismatch {
                    what: "host page size",
                    found: page_size,
                    expected,
                });
            }
        }
        let words = tracker.words();
        // Only a running device holds partial pages, at most one per host page of RAM.
        let max = if active {
            usize_of(ctx.ram.size() / page_size)
        } else {
            0
        };
        let elem = words.saturating_add(1).saturating_mul(8);
        let n = r.count("partial host pages", max, elem)?;
        let mut last = None;
        for _ in 0..n {
            let host = r.u64("partial host page")?;
            if host % page_size != 0
                || last.is_some_and(|l| host <= l)
                || !in_ram(ctx.ram, host, page_size)
            {
                return Err(PersistError::Invalid("partial host page address"));
            }
            last = Some(host);
            let mut bits = Vec::with_capacity(words);
            for _ in 0..words {
                bits.push(r.u64("partial host page pieces")?);
            }
            let beyond = tracker.pieces % 64;
            let stray = beyond != 0 && bits.last().is_some_and(|&w| w >> beyond != 0);
            if stray || bits.iter().all(|&w| w == 0) || tracker.full(&bits) {
                return Err(PersistError::Invalid("partial host page pieces"));
            }
            tracker.partial.insert(host, bits);
        }

        let n = r.count("statistics", MAX_STATS, 10)?;
        let mut values = BTreeMap::new();
        let mut last = None;
        for _ in 0..n {
            let tag = r.u16("statistic tag")?;
            if last.is_some_and(|l| tag <= l) {
                return Err(PersistError::Invalid("statistic tag order"));
            }
            last = Some(tag);
            values.insert(tag, r.u64("statistic value")?);
        }
        let stats = BalloonStats {
            values,
            updates: r.u64("statistics updates")?,
        };

        let held = r.flag("statistics buffer presence")?;
        let head = r.u16("statistics buffer head")?;
        let stats_head = if held {
            let index = roles_of(acked).iter().position(|&r| r == Role::Stats);
            let queue = index.and_then(|i| ctx.queues.get(i)).filter(|q| q.ready);
            match queue {
                Some(q) if active && head < q.size => Some(head),
                _ => return Err(PersistError::Invalid("statistics buffer head")),
            }
        } else {
            if head != 0 {
                return Err(PersistError::Invalid("statistics buffer head"));
            }
            None
        };
        let discarded = r.flag("discarded")?;

        let count = r.count("queues", self.queue_sizes.len(), 5)?;
        let expected = if active { ctx.queues.len() } else { 0 };
        if count != expected {
            return Err(PersistError::Mismatch {
                what: "balloon queue count",
                found: u64::try_from(count).unwrap_or(u64::MAX),
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
            });
        }
        let mut positions = Vec::with_capacity(count);
        for config in &ctx.queues[..count] {
            let present = r.flag("queue presence")?;
            let next_avail = r.u16("queue next_avail")?;
            let next_used = r.u16("queue next_used")?;
            if present != config.ready {
                return Err(PersistError::Invalid("queue presence"));
            }
            if !present {
                if next_avail != 0 || next_used != 0 {
                    return Err(PersistError::Invalid("queue position"));
                }
                positions.push(None);
                continue;
            }
            // The device never holds more chains than the queue has entries.
            if next_avail.wrapping_sub(next_used) > config.size {
                return Err(PersistError::Invalid("queue position"));
            }
            positions.push(Some((next_avail, next_used)));
        }
        Ok(BalloonState {
            active,
            num_pages,
            actual,
            acked,
            tracker,
            stats,
            stats_head,
            discarded,
            positions,
        })
    }

    pub(super) fn restore(&mut self, state: BalloonState) {
        self.num_pages = state.num_pages;
        self.actual = state.actual;
        self.acked = state.acked;
        self.tracker = state.tracker;
        self.stats = state.stats;
        self.stats_head = state.stats_head;
        self.discarded = state.discarded;
        if state.active {
            for (queue, pos) in self.queues.iter_mut().zip(state.positions) {
                if let (Some(q), Some((next_avail, next_used))) = (queue.as_mut(), pos) {
                    *q = Queue::with_position(*q.config(), next_avail, next_used);
                }
            }
        } else {
            // As a reset leaves it, without giving memory back: the RAM is the guest's
            // as migrated.
            self.queues.clear();
            self.roles.clear();
            self.ram = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rangevm_memory::GuestRam;
    use virtio_bindings::virtio_mmio as reg;

    use super::*;
    use crate::persist::tests::{assert_damage_is_refused, payload_of, reframe};
    use crate::persist::{SERIAL_MAGIC, VIRTIO_MMIO_MAGIC};
    use crate::virtio::balloon::{BalloonConfig, DEFLATE_QUEUE, INFLATE_QUEUE};
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::test_utils::{TestDriver, RAM_SIZE};
    use crate::virtio::VIRTIO_F_VERSION_1;

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    const STATS: u64 = 1 << VIRTIO_BALLOON_F_STATS_VQ;
    const KIB64: u64 = 64 << 10;
    /// A 64 KiB-aligned balloon page (8 MiB).
    const BASE: u32 = 0x800;
    const STATS_QUEUE: usize = 2;
    /// Where the balloon's part of the transport payload starts, with three queues:
    /// the transport's registers (40 bytes), 3 queues of 29, activated, interrupt
    /// status, generation.
    const BALLOON_PART: usize = 40 + 3 * 29 + 1 + 4 + 4;

    fn balloon() -> Balloon {
        Balloon::with_host_page_size(BalloonConfig::default(), KIB64)
    }

    fn addr(pfn: u32) -> u64 {
        u64::from(pfn) << 12
    }

    fn pfn_buffer(d: &mut TestDriver<Balloon>, pfns: &[u32]) -> (u64, u32) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        (d.buffer(&bytes), u32::try_from(bytes.len()).unwrap())
    }

    /// A balloon on a simulated 64 KiB host that the driver has used: a target set,
    /// `actual` written back, one host page inflated whole, three pieces of the next
    /// one, statistics held, a config interrupt pending, and a chain with the rest of
    /// the partial host page made available but not notified.
    fn used_balloon() -> (TestDriver<Balloon>, u16) {
        let mut d = TestDriver::new(balloon());
        d.start(V1 | STATS, 3);
        d.transport.device_mut().set_target_pages(32);
        assert_eq!(d.take_interrupt(), reg::VIRTIO_MMIO_INT_CONFIG);
        let pieces: Vec<u32> = (BASE..BASE + 16).chain(BASE + 16..BASE + 19).collect();
        let (buf, len) = pfn_buffer(&mut d, &pieces);
        d.add_chain(INFLATE_QUEUE, &[(buf, len, false)]);
        d.notify(0);
        assert_eq!(d.take_used(INFLATE_QUEUE).len(), 1);
        d.write_config32(4, 19);
        let stats: Vec<u8> = [(4u16, 1000u64), (5, 4000), (99, 7)]
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        let buf = d.buffer(&stats);
        d.add_chain(STATS_QUEUE, &[(buf, 30, false)]);
        d.notify(2);
        assert!(d.take_used(STATS_QUEUE).is_empty(), "stats buffer held");
        // The host raises the target again: the interrupt stays pending.
        d.transport.device_mut().set_target_pages(48);
        // The rest of the second host page, made available and not notified.
        let rest: Vec<u32> = (BASE + 19..BASE + 32).collect();
        let (buf, len) = pfn_buffer(&mut d, &rest);
        let pending = d.add_chain(INFLATE_QUEUE, &[(buf, len, false)]);
        assert_eq!(d.transport.device().partial_host_pages(), 1);
        (d, pending)
    }

    /// Everything the guest can read through the transport's registers.
    fn guest_view(d: &mut TestDriver<Balloon>) -> Vec<u32> {
        let mut view = vec![
            d.read32(reg::VIRTIO_MMIO_DEVICE_ID),
            d.status(),
            d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            d.read32(reg::VIRTIO_MMIO_CONFIG_GENERATION),
            d.read_config32(0),
            d.read_config32(4),
        ];
        for q in 0..4 {
            d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, q);
            view.push(d.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX));
            view.push(d.read32(reg::VIRTIO_MMIO_QUEUE_READY));
        }
        d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        view
    }

    fn used_idx(d: &TestDriver<Balloon>, q: usize) -> u16 {
        d.ram.read_obj(d.queues[q].used + 2).unwrap()
    }

    #[test]
    fn a_restored_balloon_continues_where_the_old_one_stopped() {
        let (mut d, pending) = used_balloon();
        let bytes = d.transport.save_state().unwrap();
        assert_eq!(&bytes[..4], b"RVVM");
        let before = guest_view(&mut d);
        let used_before: Vec<u16> = (0..3).map(|q| used_idx(&d, q)).collect();
        let dirty = d.ram.page_state(d.queues[0].used).unwrap().dirty;

        // A fresh transport over the same guest RAM takes the old one's place.
        let mut fresh = MmioTransport::new(balloon(), Arc::clone(&d.ram)).unwrap();
        fresh.restore_state(&bytes).unwrap();
        assert_eq!(fresh.save_state().unwrap(), bytes, "saved again the same");
        assert!(fresh.is_activated());
        assert!(
            fresh.interrupt().eventfd().read().is_err(),
            "the restore raised no interrupt"
        );
        let old = std::mem::replace(&mut d.transport, fresh);
        assert_eq!(guest_view(&mut d), before);
        assert_eq!(d.read_config32(0), 48);
        assert_eq!(d.read_config32(4), 19);
        // The inflate's used-buffer interrupt and the second config change, unacked.
        assert_eq!(
            d.take_interrupt(),
            reg::VIRTIO_MMIO_INT_VRING | reg::VIRTIO_MMIO_INT_CONFIG
        );
        let dev = d.transport.device();
        assert_eq!(dev.acked_features(), V1 | STATS);
        assert_eq!(dev.stats(), old.device().stats());
        assert_eq!(dev.partial_host_pages(), 1);
        // Nothing in the rings was touched.
        let used_after: Vec<u16> = (0..3).map(|q| used_idx(&d, q)).collect();
        assert_eq!(used_after, used_before);
        assert_eq!(d.ram.page_state(d.queues[0].used).unwrap().dirty, dirty);

        // The pending chain is served from where the old device stopped: the used
        // index goes on from 1, and it completes the partial host page.
        d.notify(0);
        assert_eq!(d.take_used(INFLATE_QUEUE), vec![(u32::from(pending), 0)]);
        assert_eq!(used_idx(&d, INFLATE_QUEUE), used_before[0] + 1);
        assert_eq!(d.transport.device().partial_host_pages(), 0);
        for p in BASE..BASE + 32 {
            assert!(d.ram.page_state(addr(p)).unwrap().ballooned, "{p:#x}");
        }
        // The held statistics buffer goes back to the driver on request.
        assert!(d.transport.device_mut().request_stats());
        assert_eq!(d.take_used(STATS_QUEUE), vec![(0, 0)]);
        // Deflate works, and the next inflate chain follows on.
        let (buf, len) = pfn_buffer(&mut d, &[BASE + 1]);
        d.add_chain(DEFLATE_QUEUE, &[(buf, len, false)]);
        d.notify(1);
        assert_eq!(d.take_used(DEFLATE_QUEUE).len(), 1);
        assert!(!d.ram.page_state(addr(BASE)).unwrap().ballooned);
        assert_eq!(d.transport.device().partial_host_pages(), 1);
    }

    #[test]
    fn a_device_not_yet_running_restores_and_starts() {
        let mut d = TestDriver::new(balloon());
        d.transport.device_mut().set_target_pages(9);
        assert!(d.negotiate(V1 | STATS));
        assert!(d.setup_queue(0, 64, None));
        d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 1000);
        let bytes = d.transport.save_state().unwrap();
        let before = guest_view(&mut d);

        // Restored into a running device, which stops.
        let (mut running, _) = used_balloon();
        let ram = Arc::clone(&running.ram);
        running.transport = MmioTransport::new(balloon(), ram).unwrap();
        running.start(V1, 2);
        running.transport.restore_state(&bytes).unwrap();
        assert!(!running.transport.is_activated());
        assert_eq!(running.transport.save_state().unwrap(), bytes);

        let mut fresh = MmioTransport::new(balloon(), Arc::clone(&d.ram)).unwrap();
        fresh.restore_state(&bytes).unwrap();
        d.transport = fresh;
        assert_eq!(guest_view(&mut d), before);
        assert_eq!(d.read_config32(0), 9);
        assert!(d.setup_queue(1, 64, None));
        assert!(d.setup_queue(2, 64, None));
        d.driver_ok();
        assert!(d.transport.is_activated());
        let (buf, len) = pfn_buffer(&mut d, &(BASE..BASE + 16).collect::<Vec<_>>());
        d.add_chain(0, &[(buf, len, false)]);
        d.notify(0);
        assert_eq!(d.take_used(0), vec![(0, 0)]);
        assert!(d.ram.page_state(addr(BASE)).unwrap().ballooned);
    }

    #[test]
    fn damaged_state_is_refused_and_changes_nothing() {
        let (d, _) = used_balloon();
        let bytes = d.transport.save_state().unwrap();
        // The target runs with a state of its own, over the same RAM.
        let mut target = TestDriver::with_ram(balloon(), Arc::clone(&d.ram));
        target.start(V1, 2);
        target.transport.device_mut().set_target_pages(5);
        assert_damage_is_refused(&bytes, VIRTIO_MMIO_MAGIC, |b| {
            let before = target.transport.save_state().unwrap();
            let result = target.transport.restore_state(b);
            if result.is_err() {
                assert_eq!(target.transport.save_state().unwrap(), before);
            }
            result
        });
    }

    /// Restores `payload`, reframed with a valid checksum, into a fresh transport.
    fn restore_payload(ram: &Arc<GuestRam>, payload: &[u8]) -> Result<(), PersistError> {
        let mut t = MmioTransport::new(balloon(), Arc::clone(ram)).unwrap();
        let before = t.save_state().unwrap();
        let result = t.restore_state(&reframe(VIRTIO_MMIO_MAGIC, 1, payload));
        if result.is_err() {
            assert_eq!(t.save_state().unwrap(), before);
        }
        result
    }

    #[test]
    fn foreign_and_impossible_state_is_refused() {
        let (d, _) = used_balloon();
        let bytes = d.transport.save_state().unwrap();
        let payload = payload_of(&bytes).to_vec();
        assert!(restore_payload(&d.ram, &payload).is_ok());
        let patched = |at: usize, new: &[u8]| {
            let mut p = payload.clone();
            p[at..at + new.len()].copy_from_slice(new);
            restore_payload(&d.ram, &p)
        };

        // Another kind of state.
        let serial = reframe(SERIAL_MAGIC, 1, &[0; 10]);
        let mut t = MmioTransport::new(balloon(), Arc::clone(&d.ram)).unwrap();
        assert!(matches!(
            t.restore_state(&serial).unwrap_err(),
            PersistError::Magic("virtio-mmio")
        ));
        // Another device type, queue count, or feature set.
        assert!(matches!(
            patched(0, &1u32.to_le_bytes()).unwrap_err(),
            PersistError::Mismatch {
                what: "device type",
                ..
            }
        ));
        assert!(matches!(
            patched(12, &4u32.to_le_bytes()).unwrap_err(),
            PersistError::Mismatch {
                what: "queue count",
                ..
            }
        ));
        let mut other = MmioTransport::new(
            Balloon::new(BalloonConfig {
                free_page_reporting: true,
                ..BalloonConfig::default()
            }),
            Arc::clone(&d.ram),
        )
        .unwrap();
        assert!(matches!(
            other.restore_state(&bytes).unwrap_err(),
            PersistError::Mismatch {
                what: "offered features",
                ..
            }
        ));
        // The same balloon on a 4 KiB host.
        let mut small =
            MmioTransport::new(Balloon::new(BalloonConfig::default()), Arc::clone(&d.ram)).unwrap();
        assert!(matches!(
            small.restore_state(&bytes).unwrap_err(),
            PersistError::Mismatch {
                what: "host page size",
                ..
            }
        ));

        // Queue 0: size above the maximum, not a power of two, rings outside RAM.
        assert!(matches!(
            patched(40, &512u16.to_le_bytes()).unwrap_err(),
            PersistError::Queue { index: 0, .. }
        ));
        assert!(patched(40, &100u16.to_le_bytes()).is_err());
        assert!(patched(42, &512u16.to_le_bytes()).is_err(), "maximum size");
        assert!(matches!(
            patched(45, &RAM_SIZE.to_le_bytes()).unwrap_err(),
            PersistError::Queue { index: 0, .. }
        ));
        assert!(patched(45 + 16, &(u64::MAX - 3).to_le_bytes()).is_err());
        // Status bits, activation and interrupt bits that cannot be.
        assert!(patched(16, &0x100u32.to_le_bytes()).is_err());
        assert!(
            patched(16, &0x7u32.to_le_bytes()).is_err(),
            "running without DRIVER_OK"
        );
        assert!(patched(BALLOON_PART - 9, &[2]).is_err());
        assert!(patched(BALLOON_PART - 8, &4u32.to_le_bytes()).is_err());

        // The balloon's part: acked features, partial page count and contents.
        let b = BALLOON_PART;
        assert!(patched(b + 8, &0u64.to_le_bytes()).is_err());
        assert!(patched(b + 16, &(KIB64 * 2).to_le_bytes()).is_err());
        assert!(patched(b + 16, &3u64.to_le_bytes()).is_err());
        assert!(matches!(
            patched(b + 24, &u32::MAX.to_le_bytes()).unwrap_err(),
            PersistError::TooMany { .. }
        ));
        assert!(matches!(
            patched(b + 24, &200u32.to_le_bytes()).unwrap_err(),
            PersistError::Truncated { .. }
        ));
        // The one partial page: its address (unaligned, outside RAM), its pieces
        // (none, a stray bit beyond the 16 pieces).
        assert!(patched(b + 28, &(addr(BASE + 16) + 4096).to_le_bytes()).is_err());
        assert!(patched(b + 28, &RAM_SIZE.to_le_bytes()).is_err());
        assert!(patched(b + 36, &0u64.to_le_bytes()).is_err());
        assert!(patched(b + 36, &0x1_0007u64.to_le_bytes()).is_err());
        assert!(patched(b + 36, &0xffffu64.to_le_bytes()).is_err(), "whole");
        assert!(patched(b + 36, &0x1u64.to_le_bytes()).is_ok(), "one piece");
        // Statistics count past the bytes, tags out of order.
        let stats = b + 44;
        assert!(patched(stats, &100_000u32.to_le_bytes()).is_err());
        assert!(patched(stats + 4, &200u16.to_le_bytes()).is_err());
        // The held statistics buffer's head outside the queue; queue positions
        // further apart than the queue is long.
        let held = stats + 4 + 3 * 10 + 8;
        assert!(patched(held, &[2]).is_err());
        assert!(patched(held + 1, &300u16.to_le_bytes()).is_err());
        let queues = held + 4;
        assert!(patched(queues, &2u32.to_le_bytes()).is_err());
        assert!(patched(queues + 4, &[0]).is_err());
        assert!(patched(queues + 5, &300u16.to_le_bytes()).is_err());
        assert!(patched(queues + 5, &2u16.to_le_bytes()).is_ok());
        assert_eq!(queues + 4 + 3 * 5, payload.len());
    }
}
