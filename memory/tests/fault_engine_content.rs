//! The fault engine on real userfaultfd: every page faulted in, by several host threads
//! at once, through several handlers and shards, holds its source's content.

mod fault_engine_common;

use std::sync::{Arc, Barrier};

use fault_engine_common::{
    page_len, pattern_page, pattern_word, read_page, touch, PatternSource, TempFile, Watchdog,
};
use rangevm_memory::{
    host_page_size, FaultEngine, FaultEngineConfig, GuestRam, ImageLayout, ImageSource, LockMode,
};

/// Two regions with a hole between them (so shards straddle a region boundary and the
/// hole): pages 0..96 and 128..192.
fn two_regions(mode: LockMode) -> Arc<GuestRam> {
    let page = host_page_size();
    Arc::new(GuestRam::new_missing(mode, &[(0, 96 * page), (128 * page, 64 * page)]).unwrap())
}

/// The guest page numbers of `ram`, in address order.
fn pages_of(ram: &GuestRam) -> Vec<u64> {
    let page = host_page_size();
    ram.regions()
        .iter()
        .flat_map(|r| r.start / page..r.end() / page)
        .collect()
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn every_page_faulted_in_by_concurrent_touchers_has_the_source_content() {
    let _watchdog = Watchdog::arm("every_page_faulted_in_by_concurrent_touchers");
    let page = host_page_size();
    let words = page / 8;
    for mode in [LockMode::Range, LockMode::Global] {
        for (handlers, shards) in [(2, 2), (4, 2), (2, 3), (3, 4)] {
            let what = format!("{mode:?} {handlers} handlers x {shards} shards");
            let ram = two_regions(mode);
            let source = Arc::new(PatternSource::new(192));
            let engine = FaultEngine::start(
                Arc::clone(&ram),
                Arc::clone(&source) as _,
                FaultEngineConfig { handlers, shards },
            )
            .unwrap();
            assert!(engine.shards() >= 2, "{what}: {} shards", engine.shards());
            let pages = pages_of(&ram);
            let n = pages.len();
            // Four touchers walk every page, each in its own order (strides coprime with
            // the page count), starting together: most pages are faulted by several
            // threads at nearly the same time, on different shards.
            let start = Barrier::new(4);
            std::thread::scope(|s| {
                for (t, stride) in [7usize, 11, 13, 17].into_iter().enumerate() {
                    let (ram, pages, start, what) = (&ram, &pages, &start, &what);
                    s.spawn(move || {
                        start.wait();
                        for i in 0..n {
                            let p = pages[(i * stride + t * 29) % n];
                            let w = (p * 31 + t as u64 * 97) % words;
                            let got = touch(ram, p * page, w);
                            assert_eq!(got, pattern_word(p, w), "{what}: page {p} word {w}");
                        }
                    });
                }
            });
            // Every page in full, read under the range lock now that all are present
            // (the lock also waits for the handler that woke the last toucher to mark
            // its page present: the kernel wakes the toucher inside UFFDIO_COPY).
            for &p in &pages {
                assert!(
                    read_page(&ram, p * page) == pattern_page(p),
                    "{what}: content of page {p}"
                );
                assert!(
                    ram.page_state(p * page).unwrap().present,
                    "{what}: page {p}"
                );
                assert_eq!(source.reads(p), 1, "{what}: page {p} fetched once");
            }
            let stats = engine.stop();
            assert_eq!(stats.copied, n as u64, "{what}: {stats:?}");
            assert_eq!(stats.zeroed, 0, "{what}: {stats:?}");
            assert_eq!(stats.errors, 0, "{what}: {stats:?}");
            assert!(ram.range_lock().is_idle(), "{what}");
            if mode == LockMode::Range {
                let waits = ram.range_lock().stats();
                assert_eq!(waits.disjoint_waits, 0, "{what}: {waits:?}");
            }
            // The pages stay filled after the engine is gone.
            assert_eq!(touch(&ram, 150 * page, 3), pattern_word(150, 3), "{what}");
        }
    }
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn pages_faulted_in_from_a_memory_image_match_the_file() {
    let _watchdog = Watchdog::arm("pages_faulted_in_from_a_memory_image_match_the_file");
    let page = host_page_size();
    let p_len = page_len();
    // Guest pages 0..96 and 128..192. The image holds pattern_page(p) for each guest
    // page, except page 10 (all zeros), and ends half-way through page 168.
    let expected = |p: u64| -> Vec<u8> {
        let mut want = pattern_page(p);
        match p {
            10 | 169.. => want.fill(0),
            168 => want[p_len / 2..].fill(0),
            _ => {}
        }
        want
    };
    let ram_layout = two_regions(LockMode::Range);
    let regions = ram_layout.regions();
    drop(ram_layout);
    for layout in [ImageLayout::Flat, ImageLayout::Packed(regions.clone())] {
        let ram = two_regions(LockMode::Range);
        let pages = pages_of(&ram);
        let mut image = Vec::new();
        for &p in &pages {
            if layout == ImageLayout::Flat {
                // Offset = guest address: the hole is zeros in the file.
                image.resize(usize::try_from(p * page).unwrap(), 0);
            }
            image.extend(expected(p));
        }
        let cut = image.len() - (192 - 168) * p_len + p_len / 2;
        image.truncate(cut);
        let file = TempFile::with(&image);
        let source = ImageSource::open(&file.0, layout.clone()).unwrap();
        let engine = FaultEngine::start(
            Arc::clone(&ram),
            Arc::new(source),
            FaultEngineConfig {
                handlers: 2,
                shards: 2,
            },
        )
        .unwrap();
        std::thread::scope(|s| {
            for t in 0..3usize {
                let (ram, pages, layout, expected) = (&ram, &pages, &layout, &expected);
                s.spawn(move || {
                    for i in 0..pages.len() {
                        let p = pages[(i * 7 + t * 50) % pages.len()];
                        // Toucher t reads word t of its pages.
                        let bytes = &expected(p)[t * 8..t * 8 + 8];
                        let want = u64::from_ne_bytes(bytes.try_into().unwrap());
                        let got = touch(ram, p * page, u64::try_from(t).unwrap());
                        assert_eq!(got, want, "{layout:?} page {p}");
                    }
                });
            }
        });
        for &p in &pages {
            assert!(
                read_page(&ram, p * page) == expected(p),
                "{layout:?} page {p}"
            );
        }
        let stats = engine.stop();
        // Zero pages: page 10 and the 23 pages wholly past the end of the file.
        assert_eq!(
            (stats.copied, stats.zeroed),
            (136, 24),
            "{layout:?}: {stats:?}"
        );
        assert_eq!(stats.errors, 0, "{layout:?}: {stats:?}");
    }
}
