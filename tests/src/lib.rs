//! Test harness for rangevm integration tests.
