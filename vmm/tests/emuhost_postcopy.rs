//! Postcopy migration of a real Linux guest between two rangevm processes inside the
//! emulated x86_64 host, with the virtio balloon used on the destination while its
//! memory is still arriving (the scenario is in `common/postcopy_balloon.rs`).

#[path = "common/linux_guest.rs"]
mod linux_guest;
#[path = "common/postcopy_balloon.rs"]
mod postcopy_balloon;

#[test]
fn a_linux_guest_migrates_in_postcopy_and_its_balloon_works_meanwhile_inside_the_emulated_host() {
    postcopy_balloon::postcopy_with_balloon(linux_guest::Setup::x86_64());
}
