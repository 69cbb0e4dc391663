//! End-to-end tests of the library and the `snapstore` binary, as one test binary (one link, shared helpers).

mod catalog_eio;
mod checkpointer;
mod cli;
mod coarse_time;
mod crash;
mod diff;
mod fault_points;
mod faults;
mod full_disk;
mod gc;
mod groups;
mod inplace;
mod library;
mod power_loss;
#[cfg(feature = "s3")]
mod s3;
mod util;
mod verify;
mod watch;
mod xattrs;
