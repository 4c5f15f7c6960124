//! The virtual TAP's agent side (issue 7). So far: rate control.

pub mod limit;
