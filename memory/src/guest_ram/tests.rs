use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::*;

/// Two regions of 16 pages with a 16-page hole between them.
fn two_regions(mode: LockMode) -> (GuestRam, u64) {
    let page = host_page_size();
    let ram = GuestRam::new(mode, &[(0, 16 * page), (32 * page, 16 * page)]).unwrap();
    (ram, page)
}

#[test]
fn layout_is_reported() {
    let (ram, page) = two_regions(LockMode::Range);
    assert_eq!(ram.page_size(), page);
    assert_eq!(ram.size(), 32 * page);
    assert_eq!(
        ram.regions(),
        vec![
            RegionInfo {
                start: 0,
                size: 16 * page
            },
            RegionInfo {
                start: 32 * page,
                size: 16 * page
            }
        ]
    );
    assert!(ram.range_lock().granule() >= page);
}

#[test]
fn dma_round_trip_marks_dirty_once() {
    let (ram, page) = two_regions(LockMode::Range);
    let data: Vec<u8> = (0..=255).cycle().take(usize_of(page) + 100).collect();
    let addr = 3 * page - 50;
    ram.write(addr, &data).unwrap();
    let mut back = vec![0; data.len()];
    ram.read(addr, &mut back).unwrap();
    assert_eq!(back, data);
    ram.write_obj(40 * page + 8, 0xdead_beef_u32).unwrap();
    assert_eq!(ram.read_obj::<u32>(40 * page + 8).unwrap(), 0xdead_beef);
    // Pages 2, 3 and 4 of region 0 and page 8 of region 1 were written.
    let dirty = ram.take_dirty(0..48 * page);
    assert!(dirty.is_err(), "the hole is not RAM");
    let mut dirty = ram.take_dirty(0..16 * page).unwrap();
    dirty.extend(ram.take_dirty(32 * page..48 * page).unwrap());
    assert_eq!(dirty, vec![2 * page, 3 * page, 4 * page, 40 * page]);
    assert!(ram.page_state(3 * page).unwrap().present);
    assert!(!ram.page_state(3 * page).unwrap().dirty, "harvest clears");
    assert!(ram.take_dirty(0..16 * page).unwrap().is_empty());
}

#[test]
fn access_outside_ram_is_an_error() {
    let (ram, page) = two_regions(LockMode::Range);
    let mut buf = [0u8; 8];
    assert!(matches!(
        ram.read(20 * page, &mut buf),
        Err(GuestRamError::NotMapped { .. })
    ));
    // Straddling the end of region 0 into the hole.
    assert!(ram.write(16 * page - 4, &buf).is_err());
    assert!(ram.write(u64::MAX - 3, &buf).is_err());
    assert!(ram.page_state(17 * page).is_err());
    // Nothing was left locked by the failures.
    assert!(ram.range_lock().is_idle());
    // Empty buffers are fine anywhere.
    ram.write(20 * page, &[]).unwrap();
}

#[test]
fn discard_zeroes_and_balloons_whole_pages() {
    let (ram, page) = two_regions(LockMode::Range);
    ram.write(4 * page, &vec![0xaa; usize_of(4 * page)])
        .unwrap();
    ram.take_dirty(0..16 * page).unwrap();
    assert!(matches!(
        ram.discard(4 * page + 1..6 * page),
        Err(GuestRamError::Unaligned { .. })
    ));
    ram.discard(5 * page..7 * page).unwrap();
    let mut buf = vec![0u8; usize_of(4 * page)];
    ram.read(4 * page, &mut buf).unwrap();
    let p = usize_of(page);
    assert!(buf[..p].iter().all(|&b| b == 0xaa), "page 4 untouched");
    assert!(buf[p..3 * p].iter().all(|&b| b == 0), "pages 5-6 zero");
    assert!(buf[3 * p..].iter().all(|&b| b == 0xaa), "page 7 untouched");
    let s = ram.page_state(5 * page).unwrap();
    assert!(s.ballooned && s.dirty);
    assert!(!ram.page_state(7 * page).unwrap().ballooned);
    assert_eq!(
        ram.take_dirty(0..16 * page).unwrap(),
        vec![5 * page, 6 * page]
    );
    // Deflate: no longer ballooned, still zero.
    ram.reclaim(5 * page..6 * page).unwrap();
    assert!(!ram.page_state(5 * page).unwrap().ballooned);
    assert!(ram.page_state(6 * page).unwrap().ballooned);
    // A DMA write into a ballooned page un-balloons it.
    ram.write(6 * page + 10, &[1]).unwrap();
    assert!(!ram.page_state(6 * page).unwrap().ballooned);
    assert!(
        ram.discard(15 * page..17 * page).is_err(),
        "past the region"
    );
}

#[test]
fn regions_are_added_and_removed_under_the_lock() {
    let (ram, page) = two_regions(LockMode::Range);
    assert!(matches!(
        ram.add_region(8 * page, 16 * page),
        Err(GuestRamError::Overlap { .. })
    ));
    assert!(matches!(
        ram.add_region(16 * page + 1, page),
        Err(GuestRamError::Unaligned { .. })
    ));
    assert!(ram.add_region(16 * page, 0).is_err());
    ram.add_region(16 * page, 16 * page).unwrap();
    // Now one contiguous 48-page stretch: a write across both boundaries works.
    ram.write(16 * page - 2, &vec![7; usize_of(16 * page) + 4])
        .unwrap();
    assert!(matches!(
        ram.remove_region(17 * page),
        Err(GuestRamError::NoRegion(_))
    ));
    let removed = ram.remove_region(16 * page).unwrap();
    assert_eq!(removed.size, 16 * page);
    assert!(ram.read_obj::<u8>(20 * page).is_err());
    assert_eq!(ram.read_obj::<u8>(16 * page - 1).unwrap(), 7);
    assert!(ram.range_lock().is_idle());
}

#[test]
fn dma_waits_for_a_writer_on_its_range_only() {
    let (ram, page) = two_regions(LockMode::Range);
    let fault = ram.range_lock().write(2 * page..3 * page).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            ram.write(2 * page + 8, &[1, 2, 3]).unwrap();
            tx.send(()).unwrap();
        });
        // Another page is not held up.
        ram.write(3 * page, &[9]).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(fault);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    });
    assert_eq!(ram.read_obj::<[u8; 3]>(2 * page + 8).unwrap(), [1, 2, 3]);
}

#[test]
fn region_removal_waits_for_dma_inside_it() {
    let (ram, page) = two_regions(LockMode::Range);
    let dma = ram.range_lock().read(33 * page..34 * page).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            tx.send(ram.remove_region(32 * page).map(|r| r.size))
                .unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Region 0 stays usable meanwhile.
        ram.write(page, &[5]).unwrap();
        drop(dma);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
            16 * page
        );
    });
    assert_eq!(ram.regions().len(), 1);
}

#[test]
fn global_mode_makes_disjoint_dma_wait_for_a_fault() {
    let (ram, page) = two_regions(LockMode::Global);
    let fault = ram.range_lock().write(2 * page..3 * page).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            ram.write(40 * page, &[1]).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(fault);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    });
}

#[test]
fn concurrent_dma_discard_and_harvest_keep_every_write() {
    // Writers stamp pages while another thread discards and reclaims other pages and
    // a third harvests: every page written after a harvest shows up in the next one.
    let page = host_page_size();
    let ram = GuestRam::new(LockMode::Range, &[(0, 64 * page)]).unwrap();
    let (tx, rx) = mpsc::channel::<u64>();
    thread::scope(|s| {
        let ram = &ram;
        s.spawn(move || {
            for round in 0..200u64 {
                let p = round % 32;
                ram.write(p * page, &round.to_le_bytes()).unwrap();
                tx.send(p * page).unwrap();
            }
        });
        s.spawn(move || {
            for round in 0..200u64 {
                let p = 32 + round % 32;
                ram.discard(p * page..(p + 1) * page).unwrap();
                ram.reclaim(p * page..(p + 1) * page).unwrap();
            }
        });
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.extend(ram.take_dirty(0..32 * page).unwrap());
            thread::yield_now();
        }
        // Drain after the writer is done.
        let written: std::collections::BTreeSet<u64> = rx.iter().collect();
        seen.extend(ram.take_dirty(0..32 * page).unwrap());
        assert_eq!(seen, written);
    });
    assert!(ram.range_lock().is_idle());
}
