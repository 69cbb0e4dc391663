//! End-to-end tests of the library and the `snapstore` binary, as one test binary (one link, shared helpers).

mod cli;
mod crash;
mod diff;
mod faults;
mod full_disk;
mod gc;
mod inplace;
mod library;
mod util;
mod verify;
