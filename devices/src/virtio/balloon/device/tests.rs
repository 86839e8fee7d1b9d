//! The balloon against a test driver playing the guest, and the host-page aggregation
//! on its own with any host page size.

use std::sync::atomic::AtomicU64;

use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};

use super::*;
use crate::virtio::test_utils::{TestDriver, RAM_SIZE};
use crate::BusDevice;

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const STATS: u64 = 1 << VIRTIO_BALLOON_F_STATS_VQ;
const REPORTING: u64 = 1 << VIRTIO_BALLOON_F_REPORTING;
const KIB64: u64 = 64 << 10;

fn all_features() -> BalloonConfig {
    BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        free_page_reporting: true,
    }
}

/// A running balloon with inflate, deflate, stats and reporting queues.
fn running() -> TestDriver<Balloon> {
    let mut d = TestDriver::new(Balloon::new(all_features()));
    d.start(V1 | STATS | REPORTING, 4);
    d
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Sends `pfns` in one buffer on queue `q` and notifies; returns the used entries.
fn send_pfns(d: &mut TestDriver<Balloon>, q: usize, pfns: &[u32]) -> Vec<(u32, u32)> {
    let bytes = pfn_bytes(pfns);
    let buf = d.buffer(&bytes);
    let head = d.add_chain(q, &[(buf, u32::try_from(bytes.len()).unwrap(), false)]);
    d.notify(u32::try_from(q).unwrap());
    let used = d.take_used(q);
    assert!(used.contains(&(u32::from(head), 0)), "buffer returned");
    used
}

fn ballooned(d: &TestDriver<Balloon>, addr: u64) -> bool {
    d.ram.page_state(addr).unwrap().ballooned
}

fn metric(d: &TestDriver<Balloon>, f: impl Fn(&BalloonMetrics) -> &AtomicU64) -> u64 {
    BalloonMetrics::get(f(d.transport.device().metrics()))
}

fn stat_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

/// The guest page at `addr` holds `byte` everywhere (as the guest would see it).
fn fill(d: &TestDriver<Balloon>, addr: u64, len: usize, byte: u8) {
    d.ram.write(addr, &vec![byte; len]).unwrap();
}

fn reads_zero(d: &TestDriver<Balloon>, addr: u64, len: usize) -> bool {
    let mut buf = vec![0xffu8; len];
    d.ram.read(addr, &mut buf).unwrap();
    buf.iter().all(|&b| b == 0)
}

#[test]
fn inflate_discards_the_pages_and_deflate_gives_them_back() {
    let mut d = running();
    let page = d.ram.page_size();
    // Three adjacent pages and one apart, in 4 KiB PFNs covering whole host pages.
    let per = u32::try_from(page / BALLOON_PAGE_SIZE).unwrap();
    let first = 0x800u32; // 8 MiB
    let mut pfns: Vec<u32> = (first..first + 3 * per).collect();
    pfns.extend(first + 10 * per..first + 11 * per);
    let addr = |p: u32| u64::from(p) << 12;
    fill(&d, addr(first), 4096, 0x5a);

    d.take_interrupt();
    send_pfns(&mut d, INFLATE_QUEUE, &pfns);
    assert_eq!(d.take_interrupt(), reg::VIRTIO_MMIO_INT_VRING);
    for &p in &pfns {
        assert!(ballooned(&d, addr(p)), "page {p:#x} ballooned");
    }
    assert!(!ballooned(&d, addr(first + 3 * per)));
    assert!(
        reads_zero(&d, addr(first), 4096),
        "discarded pages read zero"
    );
    assert_eq!(metric(&d, |m| &m.pages_inflated), pfns.len() as u64);
    assert_eq!(metric(&d, |m| &m.bytes_discarded), 4 * page);
    assert_eq!(metric(&d, |m| &m.inflate_buffers), 1);

    // The driver reports its balloon size.
    d.write_config32(4, u32::try_from(pfns.len()).unwrap());
    assert_eq!(d.transport.device().actual_pages(), 4 * per);
    assert_eq!(d.read_config32(4), 4 * per);

    send_pfns(
        &mut d,
        DEFLATE_QUEUE,
        &pfns[..usize::try_from(per).unwrap()],
    );
    assert!(!ballooned(&d, addr(first)));
    assert!(ballooned(&d, addr(first + per)));
    assert_eq!(metric(&d, |m| &m.bytes_reclaimed), page);
    assert_eq!(metric(&d, |m| &m.deflate_buffers), 1);
    assert_eq!(metric(&d, |m| &m.guest_errors), 0);
}

#[test]
fn many_requests_wrap_the_rings() {
    let mut d = running();
    for i in 0..600u32 {
        let pfn = 0x800 + (i % 64);
        let q = if i % 2 == 0 {
            INFLATE_QUEUE
        } else {
            DEFLATE_QUEUE
        };
        let used = send_pfns(&mut d, q, &[pfn]);
        assert_eq!(used.len(), 1);
    }
    assert_eq!(metric(&d, |m| &m.inflate_buffers), 300);
    assert_eq!(metric(&d, |m| &m.deflate_buffers), 300);
}

#[test]
fn no_interrupt_when_the_driver_suppresses_it() {
    let mut d = running();
    let avail = d.queues[INFLATE_QUEUE].avail;
    d.ram.write(avail, &1u16.to_le_bytes()).unwrap();
    d.take_interrupt();
    send_pfns(&mut d, INFLATE_QUEUE, &[0x900]);
    assert_eq!(d.take_interrupt(), 0);
}

#[test]
fn stats_arrive_and_are_refreshed_on_request() {
    let mut d = running();
    let stats_q = 2;
    let first = stat_bytes(&[(4, 1000), (5, 4000), (99, 7)]);
    let buf = d.buffer(&first);
    let head = d.add_chain(
        stats_q,
        &[(buf, u32::try_from(first.len()).unwrap(), false)],
    );
    d.notify(2);
    // The device keeps the buffer until the host wants fresh numbers.
    assert!(d.take_used(stats_q).is_empty());
    let stats = d.transport.device().stats().clone();
    assert_eq!(stats.updates, 1);
    assert_eq!(stats.get(4), Some(1000));
    assert_eq!(stats.get(5), Some(4000));
    assert_eq!(stats.get(99), Some(7), "unknown tags are kept");
    assert_eq!(BalloonStats::tag_name(4), Some("free_memory"));
    assert_eq!(BalloonStats::tag_name(99), None);

    d.take_interrupt();
    assert!(d.transport.device_mut().request_stats());
    assert!(!d.transport.device_mut().request_stats(), "one outstanding");
    assert_eq!(d.take_used(stats_q), vec![(u32::from(head), 0)]);
    assert_eq!(d.take_interrupt(), reg::VIRTIO_MMIO_INT_VRING);

    // The guest refills the same buffer and gives it back.
    let second = stat_bytes(&[(4, 900), (6, 2000)]);
    d.ram.write(buf, &second).unwrap();
    d.add_chain(
        stats_q,
        &[(buf, u32::try_from(second.len()).unwrap(), false)],
    );
    d.notify(2);
    let stats = d.transport.device().stats();
    assert_eq!(stats.updates, 2);
    assert_eq!(stats.get(4), Some(900));
    assert_eq!(stats.get(6), Some(2000));
    assert_eq!(stats.get(5), Some(4000), "the latest value of each tag");
    assert_eq!(metric(&d, |m| &m.stats_updates), 2);

    // A second buffer while one is held: the old one goes back.
    let third = d.buffer(&stat_bytes(&[(4, 800)]));
    let head3 = d.add_chain(stats_q, &[(third, 10, false)]);
    d.notify(2);
    assert_eq!(d.take_used(stats_q).len(), 1);
    assert_eq!(d.transport.device().stats().get(4), Some(800));
    assert!(d.transport.device_mut().request_stats());
    assert_eq!(d.take_used(stats_q), vec![(u32::from(head3), 0)]);
}

#[test]
fn stats_with_a_torn_entry_keep_the_whole_ones() {
    let mut d = running();
    let mut bytes = stat_bytes(&[(4, 1), (5, 2)]);
    bytes.extend_from_slice(&[6, 0, 1]);
    // Split across two descriptors, the first ending inside an entry.
    let a = d.buffer(&bytes[..7]);
    let b = d.buffer(&bytes[7..]);
    d.add_chain(
        2,
        &[
            (a, 7, false),
            (b, u32::try_from(bytes.len() - 7).unwrap(), false),
        ],
    );
    d.notify(2);
    let stats = d.transport.device().stats();
    assert_eq!(
        (stats.get(4), stats.get(5), stats.get(6)),
        (Some(1), Some(2), None)
    );
    assert_eq!(metric(&d, |m| &m.guest_errors), 1);
}

#[test]
fn request_stats_without_the_feature_is_refused() {
    let mut d = TestDriver::new(Balloon::new(all_features()));
    d.start(V1, 2);
    assert!(!d.transport.device_mut().request_stats());
    d.notify(2);
}

#[test]
fn free_page_reports_discard_whole_host_pages_inside() {
    let mut d = running();
    let page = d.ram.page_size();
    let start = 4 << 20;
    fill(&d, start, usize::try_from(4 * page).unwrap(), 0x77);
    // A report from the middle of the first page to the middle of the fourth.
    let addr = start + page / 2;
    let len = u32::try_from(3 * page).unwrap();
    let head = d.add_chain(3, &[(addr, len, true)]);
    d.notify(3);
    assert_eq!(d.take_used(3), vec![(u32::from(head), 0)]);
    assert!(!ballooned(&d, start));
    assert!(ballooned(&d, start + page) && ballooned(&d, start + 2 * page));
    assert!(!ballooned(&d, start + 3 * page));
    assert!(reads_zero(
        &d,
        start + page,
        usize::try_from(2 * page).unwrap()
    ));
    assert!(!reads_zero(&d, start, 16));
    assert_eq!(metric(&d, |m| &m.bytes_discarded), 2 * page);
    assert_eq!(metric(&d, |m| &m.reports), 1);

    // Several ranges in one chain; one too small to hold a whole page.
    let h = d.add_chain(
        3,
        &[
            (6 << 20, u32::try_from(page).unwrap(), true),
            (7 << 20, 100, true),
        ],
    );
    d.notify(3);
    assert_eq!(d.take_used(3), vec![(u32::from(h), 0)]);
    assert!(ballooned(&d, 6 << 20));
    assert!(!ballooned(&d, 7 << 20));

    // A report outside RAM is logged; the next one still works.
    let h = d.add_chain(
        3,
        &[(RAM_SIZE - page, u32::try_from(2 * page).unwrap(), true)],
    );
    d.notify(3);
    assert_eq!(d.take_used(3), vec![(u32::from(h), 0)]);
    assert_eq!(metric(&d, |m| &m.guest_errors), 1);
    assert!(!ballooned(&d, RAM_SIZE - page));
}

#[test]
fn simulated_64k_host_discards_only_whole_host_pages() {
    let mut d = TestDriver::new(Balloon::with_host_page_size(all_features(), KIB64));
    d.start(V1 | STATS | REPORTING, 4);
    let base = 0x800u32; // 8 MiB, 64 KiB aligned
    let addr = |p: u32| u64::from(p) << 12;

    // 15 of the 16 pieces, out of order and in two buffers: nothing is discarded.
    let mut pieces: Vec<u32> = (base..base + 16).rev().collect();
    let last = pieces.remove(3);
    send_pfns(&mut d, INFLATE_QUEUE, &pieces[..7]);
    send_pfns(&mut d, INFLATE_QUEUE, &pieces[7..]);
    assert_eq!(d.transport.device().partial_host_pages(), 1);
    for p in base..base + 16 {
        assert!(!ballooned(&d, addr(p)), "piece {p:#x} not discarded yet");
    }
    assert_eq!(metric(&d, |m| &m.bytes_discarded), 0);
    // The last piece completes the host page: all 64 KiB go.
    send_pfns(&mut d, INFLATE_QUEUE, &[last]);
    assert_eq!(d.transport.device().partial_host_pages(), 0);
    for p in base..base + 16 {
        assert!(ballooned(&d, addr(p)));
    }
    assert_eq!(metric(&d, |m| &m.bytes_discarded), KIB64);

    // Deflating one piece reclaims the whole host page; the other 15 stay partial.
    send_pfns(&mut d, DEFLATE_QUEUE, &[base + 5]);
    assert!(!ballooned(&d, addr(base)));
    assert_eq!(metric(&d, |m| &m.bytes_reclaimed), KIB64);
    assert_eq!(d.transport.device().partial_host_pages(), 1);
    // Giving it back again discards the host page again.
    send_pfns(&mut d, INFLATE_QUEUE, &[base + 5]);
    assert!(ballooned(&d, addr(base + 15)));
    assert_eq!(metric(&d, |m| &m.bytes_discarded), 2 * KIB64);

    // A free page report smaller than a host page discards nothing.
    d.add_chain(3, &[(addr(base + 32), 32 << 10, true)]);
    d.notify(3);
    assert!(!ballooned(&d, addr(base + 32)));
}

#[test]
fn reset_gives_the_balloon_back() {
    let mut d = running();
    send_pfns(&mut d, INFLATE_QUEUE, &[0x800, 0x900]);
    assert!(ballooned(&d, 0x80_0000));
    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    assert!(!ballooned(&d, 0x80_0000));
    assert!(!ballooned(&d, 0x90_0000));
    assert_eq!(d.transport.device().actual_pages(), 0);
    d.start(V1 | STATS | REPORTING, 4);
    send_pfns(&mut d, INFLATE_QUEUE, &[0x800]);
    assert!(ballooned(&d, 0x80_0000));
}

#[test]
fn reporting_queue_moves_down_without_stats() {
    let mut d = TestDriver::new(Balloon::new(all_features()));
    d.start(V1 | REPORTING, 3);
    let page = d.ram.page_size();
    d.add_chain(2, &[(5 << 20, u32::try_from(page).unwrap(), true)]);
    d.notify(2);
    assert!(ballooned(&d, 5 << 20));
}

// ---- Bad guest input: each is logged and survived, and the next good request works.

/// Asserts that a good inflate still works after whatever came before.
fn still_works(d: &mut TestDriver<Balloon>, pfn: u32) {
    send_pfns(d, INFLATE_QUEUE, &[pfn]);
    assert!(ballooned(d, u64::from(pfn) << 12));
}

#[test]
fn pfns_outside_guest_memory_are_skipped() {
    let mut d = running();
    let outside = u32::try_from(RAM_SIZE >> 12).unwrap();
    send_pfns(
        &mut d,
        INFLATE_QUEUE,
        &[outside, 0xa00, u32::MAX, outside + 1],
    );
    assert!(ballooned(&d, 0xa0_0000), "the good PFN in the same buffer");
    assert_eq!(metric(&d, |m| &m.guest_errors), 3);
    assert_eq!(metric(&d, |m| &m.pages_inflated), 1);
    send_pfns(&mut d, DEFLATE_QUEUE, &[u32::MAX]);
    still_works(&mut d, 0xa01);
}

#[test]
fn a_descriptor_loop_is_returned_and_survived() {
    let mut d = running();
    let buf = d.buffer(&pfn_bytes(&[0xb00]));
    // Descriptor 0 points back to itself.
    d.write_desc(0, 0, buf, 4, u16::try_from(VRING_DESC_F_NEXT).unwrap(), 0);
    d.publish(0, 0);
    d.notify(0);
    assert_eq!(d.take_used(0), vec![(0, 0)]);
    assert!(!ballooned(&d, 0xb0_0000), "nothing done for a bad chain");
    // A longer loop: 1 -> 2 -> 1.
    d.write_desc(0, 1, buf, 4, u16::try_from(VRING_DESC_F_NEXT).unwrap(), 2);
    d.write_desc(0, 2, buf, 4, u16::try_from(VRING_DESC_F_NEXT).unwrap(), 1);
    d.publish(0, 1);
    d.notify(0);
    assert_eq!(d.take_used(0), vec![(1, 0)]);
    assert_eq!(metric(&d, |m| &m.guest_errors), 2);
    still_works(&mut d, 0xb01);
}

#[test]
fn lengths_that_overflow_and_odd_lengths() {
    let mut d = running();
    // addr + len wraps the address space.
    d.add_chain(0, &[(u64::MAX - 2, 16, false)]);
    d.notify(0);
    assert_eq!(d.take_used(0).len(), 1);
    assert_eq!(metric(&d, |m| &m.guest_errors), 1);
    // A 4 GiB - 4 length: refused (too long) without reading it.
    d.add_chain(0, &[(0x20_0000, u32::MAX - 3, false)]);
    d.notify(0);
    assert_eq!(d.take_used(0).len(), 1);
    assert_eq!(metric(&d, |m| &m.guest_errors), 2);
    assert_eq!(metric(&d, |m| &m.pages_inflated), 0);
    // The longest buffer taken, running past the end of RAM: the part in RAM is used,
    // then the read fails.
    d.add_chain(0, &[(RAM_SIZE - 4096, MAX_PFN_BUFFER, false)]);
    d.notify(0);
    assert_eq!(d.take_used(0).len(), 1);
    assert_eq!(metric(&d, |m| &m.guest_errors), 3);
    assert_eq!(metric(&d, |m| &m.pages_inflated), 1024);
    // A length that is not a multiple of 4: the whole PFNs are used.
    let buf = d.buffer(&pfn_bytes(&[0xc00, 0xc01]));
    d.add_chain(0, &[(buf, 6, false)]);
    d.notify(0);
    assert_eq!(d.take_used(0).len(), 1);
    assert!(ballooned(&d, 0xc0_0000));
    assert!(!ballooned(&d, 0xc0_1000));
    still_works(&mut d, 0xc02);
}

#[test]
fn unaligned_and_outside_buffers() {
    let mut d = running();
    // A PFN buffer at an odd address is fine to read.
    let buf = d.buffer(&[0; 8]) + 1;
    d.ram.write(buf, &0xd00u32.to_le_bytes()).unwrap();
    d.add_chain(0, &[(buf, 4, false)]);
    d.notify(0);
    assert!(ballooned(&d, 0xd0_0000));
    // A buffer outside RAM, and one straddling its end.
    d.add_chain(0, &[(RAM_SIZE + 0x1000, 8, false)]);
    d.add_chain(0, &[(RAM_SIZE - 4, 8, false)]);
    d.notify(0);
    assert_eq!(d.take_used(0).len(), 3);
    // A device-writable buffer on the inflate queue.
    let buf = d.buffer(&pfn_bytes(&[0xd01]));
    d.add_chain(0, &[(buf, 4, true)]);
    d.notify(0);
    assert!(!ballooned(&d, 0xd0_1000));
    assert_eq!(metric(&d, |m| &m.guest_errors), 3);
    still_works(&mut d, 0xd02);
}

#[test]
fn bad_ring_indices_and_indirect_descriptors() {
    let mut d = running();
    // A head index beyond the queue size: consumed, cannot be returned.
    d.publish(0, 300);
    d.notify(0);
    assert!(d.take_used(0).is_empty());
    // A `next` beyond the queue size.
    let buf = d.buffer(&pfn_bytes(&[0xe00]));
    d.write_desc(0, 0, buf, 4, u16::try_from(VRING_DESC_F_NEXT).unwrap(), 999);
    d.publish(0, 0);
    // An indirect descriptor.
    d.write_desc(
        0,
        1,
        buf,
        16,
        u16::try_from(VRING_DESC_F_INDIRECT).unwrap(),
        0,
    );
    d.publish(0, 1);
    d.notify(0);
    assert_eq!(d.take_used(0), vec![(0, 0), (1, 0)]);
    assert!(!ballooned(&d, 0xe0_0000));
    assert_eq!(metric(&d, |m| &m.guest_errors), 3);
    still_works(&mut d, 0xe01);

    // The available index jumps by more than the queue size: the queue stalls, logged.
    let stuck = d.queues[1].avail;
    d.ram.write(stuck + 2, &1000u16.to_le_bytes()).unwrap();
    d.notify(1);
    assert!(d.take_used(1).is_empty());
    assert_eq!(metric(&d, |m| &m.guest_errors), 4);
    still_works(&mut d, 0xe02);
}

#[test]
fn a_queue_outside_ram_is_refused_and_the_rest_works() {
    let mut d = TestDriver::new(Balloon::new(all_features()));
    assert!(d.negotiate(V1 | STATS));
    assert!(d.setup_queue(0, 256, None));
    assert!(d.setup_queue(1, 256, None));
    assert!(!d.setup_queue(2, 256, Some(RAM_SIZE + 0x10000)));
    d.driver_ok();
    assert!(d.transport.is_activated());
    d.notify(2);
    assert!(!d.transport.device_mut().request_stats());
    still_works(&mut d, 0xf00);
}

// ---- The aggregation on its own.

fn never(_: u64) -> bool {
    false
}

#[test]
fn tracker_with_4k_pages_passes_everything_through() {
    let mut t = HostPageTracker::new(4096).unwrap();
    let runs = t.inflate(&[5, 3, 4, 9, 4], never);
    assert_eq!(runs, vec![0x3000..0x6000, 0x9000..0xa000]);
    assert_eq!(
        t.deflate(&[9, 3], never),
        vec![0x3000..0x4000, 0x9000..0xa000]
    );
    assert_eq!(t.partial_pages(), 0);
}

#[test]
fn tracker_with_64k_pages_waits_for_every_piece() {
    let mut t = HostPageTracker::new(KIB64).unwrap();
    // Host pages 1 and 2 (PFNs 16..48), given in an odd order, 2 completes first.
    let mut order: Vec<u32> = (32..48).collect();
    order.extend((16..32).rev());
    let runs = t.inflate(&order[..20], never);
    assert_eq!(runs, vec![0x2_0000..0x3_0000]);
    assert_eq!(t.partial_pages(), 1);
    // Repeated pieces do not count twice.
    assert!(t.inflate(&[16, 16, 17, 17], never).is_empty());
    let runs = t.inflate(&order[20..], never);
    assert_eq!(runs, vec![0x1_0000..0x2_0000]);
    assert_eq!(t.partial_pages(), 0);
    // Both in one batch merge into one run.
    let runs = t.inflate(&(48..80).collect::<Vec<_>>(), never);
    assert_eq!(runs, vec![0x3_0000..0x5_0000]);
}

#[test]
fn tracker_repeats_in_one_batch_after_completion_are_not_partial() {
    let mut t = HostPageTracker::new(KIB64).unwrap();
    let mut pfns: Vec<u32> = (0..16).collect();
    pfns.push(3);
    assert_eq!(t.inflate(&pfns, never), vec![0..KIB64]);
    assert_eq!(t.partial_pages(), 0);
    // And one for a page already discarded is ignored.
    assert!(t.inflate(&[3], |h| h == 0).is_empty());
    assert_eq!(t.partial_pages(), 0);
}

#[test]
fn tracker_deflate_of_64k_pages() {
    let mut t = HostPageTracker::new(KIB64).unwrap();
    // Partial page: taking pieces back reclaims nothing.
    assert!(t.inflate(&[0, 1, 2], never).is_empty());
    assert!(t.deflate(&[1, 2], never).is_empty());
    assert_eq!(t.partial_pages(), 1);
    assert!(t.deflate(&[0], never).is_empty());
    assert_eq!(t.partial_pages(), 0);
    // Deflating pieces never inflated does nothing.
    assert!(t.deflate(&[40], never).is_empty());
    // A discarded page: the first piece out reclaims the whole host page, the others
    // stay in the balloon; a second piece in the same batch reclaims nothing more.
    let discarded = |h: u64| h == KIB64 || h == 3 * KIB64;
    assert_eq!(
        t.deflate(&[17, 18, 48], discarded),
        vec![KIB64..2 * KIB64, 3 * KIB64..4 * KIB64]
    );
    assert_eq!(t.partial_pages(), 2);
    // Putting the pieces back discards the host page again.
    assert_eq!(t.inflate(&[17, 18], never), vec![KIB64..2 * KIB64]);
    t.clear();
    assert_eq!(t.partial_pages(), 0);
}

#[test]
fn tracker_other_page_sizes() {
    for size in [16 << 10, 256 << 10, 2 << 20] {
        let mut t = HostPageTracker::new(size).unwrap();
        let per = u32::try_from(size / 4096).unwrap();
        let all: Vec<u32> = (0..per).collect();
        assert!(t.inflate(&all[1..], never).is_empty(), "size {size:#x}");
        assert_eq!(t.inflate(&all[..1], never), vec![0..size]);
        assert_eq!(t.host_page_of(per + 1), (size, 1));
    }
    for bad in [0, 1024, 4096 + 4096 / 2, 3 << 12] {
        assert!(matches!(
            HostPageTracker::new(bad),
            Err(BalloonError::PageSize(_))
        ));
    }
}

#[test]
fn config_space_reads_and_writes() {
    let mut d = running();
    d.transport.device_mut().set_target_pages(0x1234);
    assert_eq!(d.read_config32(0), 0x1234);
    // Byte and 16-bit reads, and the zero fields after `actual`.
    let mut b = [0u8; 2];
    d.transport.read(u64::from(reg::VIRTIO_MMIO_CONFIG), &mut b);
    assert_eq!(b, [0x34, 0x12]);
    assert_eq!(d.read_config32(8), 0);
    assert_eq!(d.read_config32(12), 0);
    // Out of range reads are zero.
    assert_eq!(d.read_config32(14), 0);
    assert_eq!(d.read_config32(0xe00), 0);
    // The driver cannot write num_pages.
    d.write_config32(0, 7);
    assert_eq!(d.read_config32(0), 0x1234);
    d.write_config32(2, 7);
    // A byte write into `actual`.
    d.transport
        .write(u64::from(reg::VIRTIO_MMIO_CONFIG) + 5, &[1]);
    assert_eq!(d.transport.device().actual_pages(), 0x100);
    assert_eq!(d.transport.device().target_pages(), 0x1234);
}

/// Host-side time to inflate and deflate 1 GiB, as Linux sends it (256 PFNs per buffer,
/// up to a queue of buffers per notify). `cargo test --release -p rangevm-devices
/// -- --ignored --nocapture inflate_1g`.
#[test]
#[ignore = "timing; run by hand in release mode"]
fn inflate_1g_timing() {
    use std::time::Instant;
    const GIB: u64 = 1 << 30;
    let ram =
        Arc::new(GuestRam::new(rangevm_memory::LockMode::Range, &[(0, GIB + (16 << 20))]).unwrap());
    // Touch every page so the discard really gives memory back.
    let chunk = vec![1u8; 1 << 20];
    for mb in 0..(GIB >> 20) {
        ram.write((16 << 20) + (mb << 20), &chunk).unwrap();
    }
    let mut d = TestDriver::with_ram(Balloon::new(all_features()), ram);
    d.start(V1 | STATS, 3);
    let first = u32::try_from((16u64 << 20) >> 12).unwrap();
    let pages = u32::try_from(GIB >> 12).unwrap();
    // Contiguous PFNs (1 MiB runs), then every other page first (4 KiB runs: the worst
    // case, no run merges).
    let contiguous: Vec<u32> = (first..first + pages).collect();
    let scattered: Vec<u32> = (first..first + pages)
        .step_by(2)
        .chain((first + 1..first + pages).step_by(2))
        .collect();
    for (q, name, pfns) in [
        (INFLATE_QUEUE, "inflate, contiguous", &contiguous),
        (DEFLATE_QUEUE, "deflate, contiguous", &contiguous),
        (INFLATE_QUEUE, "inflate, scattered", &scattered),
        (DEFLATE_QUEUE, "deflate, scattered", &scattered),
    ] {
        // Buffers written up front, as the guest would have them ready.
        let buffers: Vec<u64> = pfns.chunks(256).map(|c| d.buffer(&pfn_bytes(c))).collect();
        let t = Instant::now();
        for batch in buffers.chunks(128) {
            for &b in batch {
                d.add_chain(q, &[(b, 1024, false)]);
            }
            d.notify(u32::try_from(q).unwrap());
            assert_eq!(d.take_used(q).len(), batch.len());
        }
        let took = t.elapsed();
        eprintln!("{name} of 1 GiB ({} buffers): {took:?}", buffers.len());
    }
    assert_eq!(metric(&d, |m| &m.bytes_discarded), 2 * GIB);
    assert_eq!(metric(&d, |m| &m.bytes_reclaimed), 2 * GIB);
}
