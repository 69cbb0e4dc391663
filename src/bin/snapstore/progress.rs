//! The CLI's implementation of the library's progress trait: an indicatif bar on stderr, only on a TTY.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(visible: bool) -> Arc<Self> {
        // Hidden until `start` has set it up: each setting draws a frame, in indicatif's default style first.
        Arc::new(Bar { bar: visible.then(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())) })
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl snapstore::Progress for Bar {
    fn start(&self, operation: &str, total_bytes: Option<u64>) {
        let Some(b) = &self.bar else { return };
        b.set_draw_target(ProgressDrawTarget::hidden());
        match total_bytes {
            Some(_) => {
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:8} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            None => b.set_style(
                ProgressStyle::with_template("{msg:8} {spinner} {binary_bytes} {binary_bytes_per_sec}")
                    .expect("valid template"),
            ),
        }
        if let Some(total) = total_bytes {
            b.set_length(total);
        }
        b.set_message(operation.to_string());
        b.set_draw_target(ProgressDrawTarget::stderr());
        b.enable_steady_tick(Duration::from_millis(200));
    }

    fn bytes(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    fn file(&self, _path: &Path) {}

    fn warn(&self, message: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| crate::notice("warning", message)),
            None => crate::notice("warning", message),
        }
    }
}
