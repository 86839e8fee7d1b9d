//! The PCI transport against a test driver that does what Linux's virtio_pci_modern
//! does, with the balloon as its device.

use super::*;
use crate::virtio::balloon::{Balloon, BalloonConfig, BALLOON_PAGE_SIZE, VIRTIO_ID_BALLOON};
use crate::virtio::test_utils::{test_ram, QUEUE_BASE};
use crate::virtio::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const BAR: u32 = 0x8000_0000;

fn transport() -> PciTransport<Balloon> {
    PciTransport::new(Balloon::new(BalloonConfig::default()), test_ram()).unwrap()
}

fn cfg(t: &mut PciTransport<Balloon>, offset: usize, len: usize) -> u32 {
    let mut b = [0u8; 4];
    t.config_read(offset, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_write(t: &mut PciTransport<Balloon>, offset: usize, len: usize, value: u32) {
    t.config_write(offset, &value.to_le_bytes()[..len]);
}

fn bar(t: &mut PciTransport<Balloon>, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.bar_read(offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn bar_write(t: &mut PciTransport<Balloon>, offset: u64, len: usize, value: u64) {
    t.bar_write(offset, &value.to_le_bytes()[..len]);
}

/// The vendor capabilities, walked as Linux's `pci_find_capability` walks them:
/// `(config offset, cfg_type, bar, offset, length)`.
fn capabilities(t: &mut PciTransport<Balloon>) -> Vec<(usize, u8, u8, u32, u32)> {
    let mut out = Vec::new();
    let mut at = usize::try_from(cfg(t, 0x34, 1)).unwrap();
    while at != 0 {
        assert!(out.len() < 48, "capability list loops");
        assert_eq!(cfg(t, at, 1), 0x09, "vendor-specific capability");
        let cfg_type = u8::try_from(cfg(t, at + 3, 1)).unwrap();
        let bar = u8::try_from(cfg(t, at + 4, 1)).unwrap();
        out.push((at, cfg_type, bar, cfg(t, at + 8, 4), cfg(t, at + 12, 4)));
        at = usize::try_from(cfg(t, at + 1, 1)).unwrap();
    }
    out
}

#[test]
fn header_identifies_a_modern_virtio_balloon() {
    let mut t = transport();
    assert_eq!(cfg(&mut t, 0x00, 2), 0x1af4);
    assert_eq!(cfg(&mut t, 0x02, 2), 0x1040 + VIRTIO_ID_BALLOON);
    assert_eq!(cfg(&mut t, 0x08, 1), 1, "revision 1: modern");
    assert_eq!(cfg(&mut t, 0x0e, 1), 0, "type 0 header");
    assert_ne!(cfg(&mut t, 0x06, 2) & 0x10, 0, "capability list");
    assert_eq!(cfg(&mut t, 0x3d, 1), 1, "INTA");
    assert_eq!(
        t.identity(),
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1045,
            revision: 1,
            class_code: 0xff_0000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            interrupt_pin: 1,
        }
    );
    assert_eq!(PciIdentity::of_virtio(VIRTIO_ID_BALLOON), t.identity());
    // Past the 256 bytes of a conventional function: zeros, and writes are dropped.
    assert_eq!(cfg(&mut t, 0x100, 4), 0);
    cfg_write(&mut t, 0xfe, 4, u32::MAX);
    assert_eq!(cfg(&mut t, 0xfc, 4), 0);
}

#[test]
fn capabilities_point_into_bar_0() {
    let mut t = transport();
    let caps = capabilities(&mut t);
    let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
    assert_eq!(
        types,
        [1, 2, 3, 4, 5],
        "common, notify, ISR, device, PCI cfg"
    );
    for &(at, cfg_type, bar, offset, length) in &caps {
        assert_eq!(bar, 0);
        if cfg_type != 5 {
            assert!(u64::from(offset) + u64::from(length) <= VIRTIO_PCI_BAR_SIZE);
            assert!(length >= 1);
        }
        if cfg_type == 2 {
            assert_eq!(cfg(&mut t, at + 2, 1), 20, "notify capability length");
            assert_eq!(cfg(&mut t, at + 16, 4), NOTIFY_MULTIPLIER);
        }
    }
    // Capabilities are read-only.
    let (common, ..) = caps[0];
    cfg_write(&mut t, common + 8, 4, 0x1234);
    assert_eq!(capabilities(&mut t), caps);
}

#[test]
fn bar_sizing_assignment_and_memory_decoding() {
    let mut t = transport();
    assert_eq!(cfg(&mut t, 0x10, 4), 0, "32-bit memory BAR at 0");
    assert!(!t.memory_enabled());
    cfg_write(&mut t, 0x10, 4, u32::MAX);
    let size = cfg(&mut t, 0x10, 4);
    assert_eq!(size, 0xffff_c000, "16 KiB, 32-bit");
    assert_eq!(u64::from(!(size & !0xf)) + 1, VIRTIO_PCI_BAR_SIZE);
    // BARs 1 to 5 do not exist: they size as 0.
    for b in [0x14, 0x18, 0x1c, 0x20, 0x24] {
        cfg_write(&mut t, b, 4, u32::MAX);
        assert_eq!(cfg(&mut t, b, 4), 0);
    }

    t.assign_bar(0x8345_0000 | 0x3fff);
    assert_eq!(t.bar_address(), 0x8345_0000, "size bits read as 0");
    assert!(t.memory_enabled());
    // Only memory space, bus master and INTx disable are writable.
    cfg_write(&mut t, 0x04, 2, 0xffff);
    assert_eq!(cfg(&mut t, 0x04, 2), 0x0406);
    cfg_write(&mut t, 0x04, 2, 0);
    assert!(!t.memory_enabled());
    // The interrupt line is the guest's scratch byte.
    cfg_write(&mut t, 0x3c, 1, 0x17);
    assert_eq!(cfg(&mut t, 0x3c, 1), 0x17);
    // The IDs are not writable.
    cfg_write(&mut t, 0x00, 4, 0);
    assert_eq!(cfg(&mut t, 0x00, 2), 0x1af4);
}

/// What Linux's virtio_pci_modern does up to DRIVER_OK, with `queues` queues of
/// `size` entries (rings at QUEUE_BASE + 0x4000 * n).
fn start(t: &mut PciTransport<Balloon>, features: u64, queues: u16, size: u16) {
    bar_write(t, 0x14, 1, 0);
    assert_eq!(bar(t, 0x14, 1), 0, "reset done");
    bar_write(t, 0x14, 1, u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE));
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    bar_write(t, 0x14, 1, u64::from(s));
    for sel in 0..2 {
        bar_write(t, 0x08, 4, sel);
        bar_write(t, 0x0c, 4, (features >> (32 * sel)) & 0xffff_ffff);
    }
    bar_write(t, 0x14, 1, u64::from(s | VIRTIO_CONFIG_S_FEATURES_OK));
    assert_ne!(
        bar(t, 0x14, 1) & u64::from(VIRTIO_CONFIG_S_FEATURES_OK),
        0,
        "FEATURES_OK kept"
    );
    for q in 0..queues {
        bar_write(t, 0x16, 2, u64::from(q));
        assert!(bar(t, 0x18, 2) >= u64::from(size));
        assert_eq!(bar(t, 0x1c, 2), 0, "not enabled yet");
        bar_write(t, 0x18, 2, u64::from(size));
        let base = QUEUE_BASE + u64::from(q) * 0x4000;
        // Linux writes the 64-bit addresses as two 32-bit halves.
        for (field, addr) in [(0x20, base), (0x28, base + 0x1000), (0x30, base + 0x2000)] {
            bar_write(t, field, 4, addr & 0xffff_ffff);
            bar_write(t, field + 4, 4, addr >> 32);
        }
        assert_eq!(bar(t, 0x20, 8), base);
        assert_eq!(bar(t, 0x1e, 2), u64::from(q), "notify offset");
        bar_write(t, 0x1c, 2, 1);
        assert_eq!(bar(t, 0x1c, 2), 1, "queue {q} enabled");
    }
    bar_write(
        t,
        0x14,
        1,
        u64::from(s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK),
    );
    assert!(t.is_activated());
}

#[test]
fn common_configuration_negotiates_and_starts_the_device() {
    let mut t = transport();
    // Features in two banks, as the selector picks them.
    bar_write(&mut t, 0x00, 4, 1);
    assert_eq!(bar(&mut t, 0x04, 4), V1 >> 32);
    bar_write(&mut t, 0x00, 4, 5);
    assert_eq!(bar(&mut t, 0x04, 4), 0, "no bank 5");
    let queues = u64::try_from(t.device().queue_max_sizes().len()).unwrap();
    assert!(queues >= 2);
    assert_eq!(bar(&mut t, 0x12, 2), queues, "the balloon's queues");
    assert_eq!(bar(&mut t, 0x10, 2), 0xffff, "no MSI-X vector");
    bar_write(&mut t, 0x16, 2, 9);
    assert_eq!(
        bar(&mut t, 0x18, 2),
        0,
        "a queue that does not exist has size 0"
    );

    // Without VERSION_1 the device refuses FEATURES_OK.
    bar_write(&mut t, 0x14, 1, 0);
    bar_write(&mut t, 0x14, 1, 3);
    bar_write(&mut t, 0x08, 4, 0);
    bar_write(&mut t, 0x0c, 4, 0);
    bar_write(&mut t, 0x14, 1, 3 | u64::from(VIRTIO_CONFIG_S_FEATURES_OK));
    assert_eq!(bar(&mut t, 0x14, 1), 3);

    start(&mut t, V1, 2, 16);
    assert_eq!(t.acked_features(), V1);
    bar_write(&mut t, 0x08, 4, 1);
    assert_eq!(
        bar(&mut t, 0x0c, 4),
        V1 >> 32,
        "accepted features read back"
    );
    // Queue registers are frozen after DRIVER_OK.
    bar_write(&mut t, 0x16, 2, 0);
    bar_write(&mut t, 0x18, 2, 4);
    assert_eq!(bar(&mut t, 0x18, 2), 16);
}

#[test]
fn inflate_through_the_notify_area_balloons_pages_and_raises_the_isr() {
    let mut t = transport();
    start(&mut t, V1, 2, 16);
    let page = rangevm_memory::host_page_size();
    let per = page / BALLOON_PAGE_SIZE;
    let target = 4 * page;
    let pfns: Vec<u8> = (0..per)
        .flat_map(|i| {
            u32::try_from(target / BALLOON_PAGE_SIZE + i)
                .unwrap()
                .to_le_bytes()
        })
        .collect();
    let buf = 0x10_0000;
    let ram = Arc::clone(&t.core.ram);
    ram.write(buf, &pfns).unwrap();
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&buf.to_le_bytes());
    desc[8..12].copy_from_slice(&u32::try_from(pfns.len()).unwrap().to_le_bytes());
    ram.write(QUEUE_BASE, &desc).unwrap();
    ram.write(QUEUE_BASE + 0x1000 + 4, &0u16.to_le_bytes())
        .unwrap();
    ram.write(QUEUE_BASE + 0x1000 + 2, &1u16.to_le_bytes())
        .unwrap();
    let _ = t.interrupt().eventfd().read();

    // A notify at the wrong place or width is ignored.
    bar_write(&mut t, NOTIFY_OFFSET + 2, 2, 0);
    bar_write(&mut t, NOTIFY_OFFSET, 1, 0);
    assert_eq!(ram.read_obj::<u16>(QUEUE_BASE + 0x2000 + 2).unwrap(), 0);

    bar_write(&mut t, NOTIFY_OFFSET, 2, 0);
    assert_eq!(
        ram.read_obj::<u16>(QUEUE_BASE + 0x2000 + 2).unwrap(),
        1,
        "used index moved"
    );
    assert!(ram.page_state(target).unwrap().ballooned);
    assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
    assert_ne!(
        cfg(&mut t, 0x06, 2) & 0x08,
        0,
        "INTx status bit while pending"
    );
    assert_eq!(bar(&mut t, ISR_OFFSET, 1), 1, "queue interrupt");
    assert_eq!(bar(&mut t, ISR_OFFSET, 1), 0, "the read cleared it");
    assert_eq!(cfg(&mut t, 0x06, 2) & 0x08, 0);

    // Device configuration: the driver reports the pages it holds.
    bar_write(&mut t, DEVICE_OFFSET + 4, 4, 16);
    assert_eq!(t.device().actual_pages(), 16);
    assert_eq!(bar(&mut t, DEVICE_OFFSET + 4, 4), 16);
}

#[test]
fn the_configuration_access_window_reaches_bar_0() {
    let mut t = transport();
    let window = capabilities(&mut t)
        .into_iter()
        .find(|c| c.1 == 5)
        .unwrap()
        .0;
    // Read num_queues (offset 0x12, 2 bytes) through the window.
    cfg_write(&mut t, window + 4, 1, 0);
    cfg_write(&mut t, window + 8, 4, 0x12);
    cfg_write(&mut t, window + 12, 4, 2);
    let queues = u32::try_from(t.device().queue_max_sizes().len()).unwrap();
    assert_eq!(cfg(&mut t, window + 16, 2), queues);
    // Write device_status through it.
    cfg_write(&mut t, window + 8, 4, 0x14);
    cfg_write(&mut t, window + 12, 4, 1);
    cfg_write(&mut t, window + 16, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(t.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    // A window past the BAR or on another BAR reads 0 and does nothing.
    cfg_write(&mut t, window + 8, 4, 0x4000);
    assert_eq!(cfg(&mut t, window + 16, 1), 0);
    cfg_write(&mut t, window + 4, 1, 1);
    cfg_write(&mut t, window + 8, 4, 0x14);
    cfg_write(&mut t, window + 16, 1, 0);
    assert_eq!(t.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
}

#[test]
fn any_access_anywhere_is_survived() {
    let mut t = transport();
    t.assign_bar(BAR);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let v = next();
        let len = usize::try_from(v % 9).unwrap();
        let mut data = (next()).to_le_bytes();
        match (v >> 8) % 4 {
            0 => t.config_read(usize::try_from((v >> 16) % 300).unwrap(), &mut data[..len]),
            1 => t.config_write(usize::try_from((v >> 16) % 300).unwrap(), &data[..len]),
            2 => t.bar_read((v >> 16) % 0x5000, &mut data[..len]),
            _ => t.bar_write((v >> 16) % 0x5000, &data[..len]),
        }
    }
    // Still a balloon, still answering.
    assert_eq!(cfg(&mut t, 0x00, 2), 0x1af4);
    start(&mut t, V1, 2, 16);
}

#[test]
fn state_round_trips_and_bad_state_is_refused() {
    let mut t = transport();
    t.assign_bar(BAR);
    cfg_write(&mut t, 0x3c, 1, 0x21);
    start(&mut t, V1, 2, 16);
    let saved = t.save_state().unwrap();

    let mut fresh = PciTransport::new(
        Balloon::new(BalloonConfig::default()),
        Arc::clone(&t.core.ram),
    )
    .unwrap();
    fresh.restore_state(&saved).unwrap();
    assert!(fresh.is_activated());
    assert_eq!(fresh.bar_address(), u64::from(BAR));
    assert!(fresh.memory_enabled());
    assert_eq!(cfg(&mut fresh, 0x3c, 1), 0x21);
    assert_eq!(fresh.acked_features(), V1);
    assert_eq!(fresh.save_state().unwrap(), saved);

    // Every truncation is refused, and leaves the device as it was.
    let mut other = transport();
    for cut in 0..saved.len() {
        assert!(other.restore_state(&saved[..cut]).is_err(), "cut at {cut}");
    }
    assert!(!other.is_activated());
    // A blob whose read-only bytes differ (another device ID) is refused.
    let mut w = Writer::new();
    let mut config = t.config;
    config[0x02] ^= 1;
    w.bytes(&config);
    t.core.save(&mut w).unwrap();
    let forged = w.finish(VIRTIO_PCI_MAGIC).unwrap();
    let err = other.restore_state(&forged).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // The mmio transport's blob is not a PCI one.
    let mmio = crate::MmioTransport::new(
        Balloon::new(BalloonConfig::default()),
        Arc::clone(&t.core.ram),
    )
    .unwrap()
    .save_state()
    .unwrap();
    assert!(other.restore_state(&mmio).is_err());
}
