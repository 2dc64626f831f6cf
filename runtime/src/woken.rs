//! [`WhenWoken`]: polls a future only after it asked to be woken, so that
//! a task polled for other reasons does not register with it again.
//!
//! Why: some glommio futures (accept, and every other operation that ends
//! in `Source::collect_rw`) push a clone of the task's waker on *every*
//! poll and drop the clones only when the operation completes. glommio
//! counts a task's waker references in 16 bits and panics at 32,767
//! ("Waker invariant broken"). The accept loop races its accept against a
//! 50 ms stop check, so each tick re-polled the accept: a shard that
//! accepted nothing for 32,767 ticks (27 minutes) panicked and stopped
//! serving. Behind this adapter the inner future sees a waker of its own
//! and is polled once per wake-up it asked for, so what it holds stays
//! bounded however often the task runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// A future polled only on its first poll and after it woke its waker.
#[derive(Debug)]
pub struct WhenWoken<F> {
    /// The future, polled with `proxy`'s waker.
    inner: Pin<Box<F>>,
    /// Set by the inner future's wake-ups; forwards them to the task.
    proxy: Arc<Proxy>,
    /// The proxy as a waker (made once).
    waker: Waker,
}

/// The waker the inner future sees.
#[derive(Debug, Default)]
struct Proxy {
    /// Whether the inner future woke since it was last polled.
    woken: AtomicBool,
    /// The task to wake: the latest one to poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for Proxy {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F: Future> WhenWoken<F> {
    /// Wraps `inner`; its first poll happens on the wrapper's first poll.
    pub fn new(inner: F) -> WhenWoken<F> {
        let proxy = Arc::new(Proxy { woken: AtomicBool::new(true), task: Mutex::new(None) });
        let waker = Waker::from(proxy.clone());
        WhenWoken { inner: Box::pin(inner), proxy, waker }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The task first, so that a wake-up between the check and the
        // inner poll is not lost. One waker at most is held: a new one
        // replaces the old.
        if let Ok(mut task) = self.proxy.task.lock() {
            match task.as_ref() {
                Some(held) if held.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        if !self.proxy.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner.as_mut().poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// glommio's accept registers the task's waker on every poll; 40,000
    /// polls of it without a connection panicked inside glommio before
    /// this adapter. Behind it the accept still takes the connection that
    /// comes after them.
    #[test]
    fn many_polls_of_a_waiting_accept_then_a_connection() {
        let ex = glommio::LocalExecutorBuilder::default().make().expect("executor");
        ex.run(async {
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let inner_polls = std::cell::Cell::new(0u32);
            let mut accept_op = std::pin::pin!(listener.accept());
            let counted = std::future::poll_fn(|cx| {
                inner_polls.set(inner_polls.get() + 1);
                accept_op.as_mut().poll(cx)
            });
            let mut accept = std::pin::pin!(WhenWoken::new(counted));
            let mut polls = 0u32;
            let mut client = None;
            let accepted = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = accept.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                polls += 1;
                if polls == 40_000 {
                    // The client connects only now: every poll before was spurious.
                    let mut c = std::net::TcpStream::connect(addr).expect("connect");
                    c.write_all(b"x").expect("write");
                    client = Some(c);
                }
                cx.waker().wake_by_ref(); // poll again at once
                Poll::Pending
            })
            .await;
            assert!(accepted.is_ok(), "accept failed: {accepted:?}");
            assert!(polls >= 40_000);
            // Once at first, once after the connection woke it (glommio
            // may wake once more on its way): never once per poll.
            assert!(inner_polls.get() <= 3, "inner future polled {} times", inner_polls.get());
            assert!(client.is_some());
        });
    }

    /// A future that is ready at once is polled once and done.
    #[test]
    fn ready_future_passes_through() {
        let ex = glommio::LocalExecutorBuilder::default().make().expect("executor");
        assert_eq!(ex.run(WhenWoken::new(async { 7 })), 7);
    }
}
