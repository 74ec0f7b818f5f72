//! End-to-end test fixtures: find the guest images, start flint-vmm, talk to the guest.
