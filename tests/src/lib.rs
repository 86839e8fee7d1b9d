//! Integration tests of rangevm with real guests: tiny hand-made guests under this
//! machine's KVM, and Debian guests inside an emulated host (QEMU with nested KVM).
//! The harness and the tests arrive with the boot issue; see `resources/README.md`.
