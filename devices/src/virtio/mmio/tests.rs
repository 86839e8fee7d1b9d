//! The transport against a test driver, with the balloon as its device.

use super::*;
use crate::virtio::balloon::{
    Balloon, BalloonConfig, QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_ID_BALLOON,
};
use crate::virtio::test_utils::{r, TestDriver, QUEUE_BASE, RAM_SIZE};
use crate::virtio::transport::error_chain;
use crate::virtio::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

const V1: u64 = 1 << VIRTIO_F_VERSION_1;

fn driver() -> TestDriver<Balloon> {
    TestDriver::new(Balloon::new(BalloonConfig::default()))
}

fn all_features() -> BalloonConfig {
    BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        free_page_reporting: true,
    }
}

#[test]
fn identifies_as_a_modern_balloon() {
    let mut d = driver();
    assert_eq!(d.read32(reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BALLOON);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(d.status(), 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);
    // No shared memory regions.
    d.write32(reg::VIRTIO_MMIO_SHM_SEL, 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
}

#[test]
fn offers_features_in_two_banks() {
    let mut d = TestDriver::new(Balloon::new(all_features()));
    let f = d.device_features();
    assert_eq!(
        f,
        V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | 1 << VIRTIO_BALLOON_F_REPORTING
    );
    // A bank past the second reads 0.
    d.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    // Four queues: inflate, deflate, stats, reporting.
    for q in 0..4 {
        d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(
            d.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
    }
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 4);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
}

#[test]
fn features_ok_needs_version_1_and_only_offered_bits() {
    let mut d = driver();
    assert!(!d.negotiate(0), "a legacy driver is refused");
    assert!(
        !d.negotiate(V1 | 1 << 40),
        "a feature not offered is refused"
    );
    assert!(!d.negotiate(V1 | 1 << VIRTIO_BALLOON_F_REPORTING));
    assert!(d.negotiate(V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ));
    assert_eq!(
        d.transport.acked_features(),
        V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ
    );
    // Features are frozen after FEATURES_OK.
    d.write_features(V1);
    assert_eq!(
        d.transport.acked_features(),
        V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ
    );
    // Bank 2 does not exist.
    d.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
}

#[test]
fn status_handshake_and_reset() {
    let mut d = driver();
    // DRIVER_OK before FEATURES_OK is dropped.
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(
        d.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    assert!(!d.transport.is_activated());
    // Clearing a bit other than by reset is ignored.
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(
        d.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );

    d.start(V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ, 3);
    assert_eq!(
        d.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
    );
    // Queue registers are frozen after DRIVER_OK.
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 8);
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 1);

    d.transport.device_mut().set_target_pages(5);
    assert_ne!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.status(), 0);
    assert!(!d.transport.is_activated());
    assert_eq!(d.transport.acked_features(), 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // The target survives a reset; the driver finds it when it starts again.
    assert_eq!(d.read_config32(0), 5);
    // And the device starts again.
    d.start(V1, 2);
}

#[test]
fn queue_setup_refuses_bad_sizes_and_rings() {
    let mut d = driver();
    assert!(d.negotiate(V1));
    assert!(!d.setup_queue(0, 0, None), "size 0");
    assert!(!d.setup_queue(0, 100, None), "not a power of two");
    assert!(!d.setup_queue(0, 512, None), "above the maximum");
    assert!(
        !d.setup_queue(0, 16, Some(QUEUE_BASE + 8)),
        "misaligned table"
    );
    assert!(!d.setup_queue(0, 16, Some(RAM_SIZE)), "table outside RAM");
    assert!(
        !d.setup_queue(0, 16, Some(RAM_SIZE - 16 * 8)),
        "table running out of RAM"
    );
    assert!(
        !d.setup_queue(0, 16, Some(u64::MAX - 15)),
        "table wrapping the address space"
    );
    // A queue size that does not fit 16 bits is refused too.
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0000);
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // A queue that does not exist.
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 9);
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);

    assert!(d.setup_queue(0, 16, None));
    // A ready queue's registers are frozen until it is disabled.
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 32);
    assert_eq!(d.transport.core.queues[0].size, 16);
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(d.setup_queue(0, 256, None));
}

#[test]
fn activation_without_the_inflate_queue_needs_reset() {
    let mut d = driver();
    assert!(d.negotiate(V1));
    assert!(d.setup_queue(1, 16, None));
    d.driver_ok();
    assert!(!d.transport.is_activated());
    assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(d.take_interrupt(), reg::VIRTIO_MMIO_INT_CONFIG);
    // Notifies are ignored; a reset and a proper start work.
    d.notify(0);
    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    d.start(V1, 2);
}

#[test]
fn notifies_before_driver_ok_or_to_missing_queues_are_ignored() {
    let mut d = driver();
    d.notify(0);
    assert!(d.negotiate(V1));
    assert!(d.setup_queue(0, 16, None));
    assert!(d.setup_queue(1, 16, None));
    let pfn = 0x800u32;
    let buf = d.buffer(&pfn.to_le_bytes());
    d.add_chain(0, &[(buf, 4, false)]);
    d.notify(0);
    assert!(d.take_used(0).is_empty(), "no work before DRIVER_OK");
    d.driver_ok();
    d.notify(2);
    d.notify(u32::MAX);
    // The chain made available before DRIVER_OK is processed on the first notify
    // (here through the call an ioeventfd handler makes).
    d.transport.notify_queue(0);
    assert_eq!(d.take_used(0), vec![(0, 0)]);
}

#[test]
fn bad_accesses_are_ignored() {
    let mut d = driver();
    let mut two = [0xaau8; 2];
    d.transport.read(r(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut two);
    assert_eq!(two, [0, 0], "narrow register read");
    let mut eight = [0xaau8; 8];
    d.transport
        .read(r(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut eight);
    assert_eq!(eight, [0; 8], "wide register read");
    let mut word = [0xaau8; 4];
    d.transport.read(2, &mut word);
    assert_eq!(word, [0; 4], "unaligned register read");
    d.transport.read(0xc0, &mut word);
    assert_eq!(word, [0; 4], "unknown register");
    d.transport
        .read(r(reg::VIRTIO_MMIO_QUEUE_DESC_LOW), &mut word);
    assert_eq!(word, [0; 4], "write-only register");
    let mut big = [0xaau8; 16];
    d.transport.read(r(reg::VIRTIO_MMIO_CONFIG), &mut big);
    assert_eq!(big, [0; 16], "configuration read wider than 8 bytes");

    d.transport.write(r(reg::VIRTIO_MMIO_STATUS), &[1, 0]);
    d.transport
        .write(r(reg::VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
    d.transport.write(r(reg::VIRTIO_MMIO_STATUS), &[1; 8]);
    d.transport.write(r(reg::VIRTIO_MMIO_CONFIG), &[1; 16]);
    assert_eq!(d.status(), 0);
    d.write32(reg::VIRTIO_MMIO_MAGIC_VALUE, 0);
    d.write32(0xc0, 1);
    d.write32(0xffc, 1);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    d.start(V1, 2);
}

#[test]
fn config_changes_bump_the_generation_and_interrupt_once_running() {
    let mut d = driver();
    d.transport.device_mut().set_target_pages(10);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(d.transport.interrupt().eventfd().read().is_err());
    d.start(V1, 2);
    assert_eq!(d.read_config32(0), 10);
    d.transport.device_mut().set_target_pages(20);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_CONFIG_GENERATION), 2);
    assert_eq!(d.transport.interrupt().eventfd().read().unwrap(), 1);
    assert_eq!(d.take_interrupt(), reg::VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // The same target again changes nothing.
    d.transport.device_mut().set_target_pages(20);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_CONFIG_GENERATION), 2);
    assert_eq!(d.read_config32(0), 20);
    assert_eq!(
        error_chain(&MmioError::Interrupt(VirtioError::EventFd(
            std::io::Error::other("x")
        ))),
        "Cannot create the virtio-mmio interrupt line: Cannot create the virtio interrupt eventfd: x"
    );
    assert!(format!("{:?}", d.transport).contains("MmioTransport"));
}
