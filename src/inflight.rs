//! A byte budget for the chunks between the commit walker and the assembler.
//!
//! The assembler takes chunks in file order, so while it waits for one a worker has not finished (a thread
//! the scheduler left aside, with more workers than cores), it holds every later result. Bounded channels
//! do not bound that: they only bound what sits in them. The walker therefore takes a chunk's bytes from
//! this budget before it forwards the chunk, and the assembler gives them back once it has used the chunk,
//! so the chunks and blobs alive between the two never exceed the budget, however many workers run.

use std::sync::{Condvar, Mutex};

pub(crate) struct InFlight {
    state: Mutex<State>,
    freed: Condvar,
    limit: u64,
}

struct State {
    bytes: u64,
    closed: bool,
}

impl InFlight {
    pub fn new(limit: u64) -> Self {
        InFlight { state: Mutex::new(State { bytes: 0, closed: false }), freed: Condvar::new(), limit }
    }

    /// Waits until `n` more bytes fit; a chunk larger than the whole budget passes when nothing else is in
    /// flight. False once the assembler has stopped: nothing will be given back any more.
    pub fn acquire(&self, n: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !s.closed && s.bytes > 0 && s.bytes + n > self.limit {
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.bytes += n;
        !s.closed
    }

    pub fn release(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.bytes = s.bytes.saturating_sub(n);
        self.freed.notify_one();
    }

    /// The assembler stopped: whoever waits gives up.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.freed.notify_all();
    }

    /// Closes the budget when dropped, however its holder's scope ends.
    pub fn closer(&self) -> Closer<'_> {
        Closer(self)
    }
}

pub(crate) struct Closer<'a>(&'a InFlight);

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn never_more_than_the_budget_in_flight_and_closing_frees_the_waiter() {
        let budget = Arc::new(InFlight::new(100));
        let held = Arc::new(AtomicU64::new(0));
        let (b, h) = (budget.clone(), held.clone());
        let producer = std::thread::spawn(move || {
            for _ in 0..1000 {
                assert!(b.acquire(30));
                assert!(h.fetch_add(30, Ordering::SeqCst) + 30 <= 100, "over budget");
            }
        });
        let mut taken = 0;
        while taken < 1000 {
            if held.load(Ordering::SeqCst) >= 30 {
                held.fetch_sub(30, Ordering::SeqCst);
                budget.release(30);
                taken += 1;
            } else {
                std::thread::yield_now();
            }
        }
        producer.join().unwrap();
        // Larger than the budget: admitted alone.
        assert!(budget.acquire(500));
        let b = budget.clone();
        let waiter = std::thread::spawn(move || b.acquire(1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "waits while the budget is spent");
        budget.close();
        assert!(!waiter.join().unwrap(), "a closed budget admits nothing");
    }
}
