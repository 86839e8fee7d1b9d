//! Postcopy migration of a real Linux guest between two rangevm processes inside the
//! emulated x86_64 host, with the virtio balloon used on the destination while its
//! memory is still arriving (the scenario is in `common/postcopy_balloon.rs`).

#[path = "common/postcopy_balloon.rs"]
mod postcopy_balloon;

use rangevm_tests::{DefaultGuest, EmuHost};

#[test]
fn a_linux_guest_migrates_in_postcopy_and_its_balloon_works_meanwhile_inside_the_emulated_host() {
    postcopy_balloon::postcopy_with_balloon(postcopy_balloon::Setup {
        host: EmuHost::new().with_file(env!("CARGO_BIN_EXE_rangevm")),
        guest: DefaultGuest::build().expect("build the default guest"),
        memory: "256M",
        // The x86_64 machine's balloon is on virtio-mmio; no PCI bus to probe.
        extra_cmdline: "pci=off",
    });
}
