//! Shard-local synchronisation: a one-shot slot and a wake-all event.
//! Single-threaded (`Rc`, `Cell`); never shared between shards.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A value delivered once from one task to another on the same shard.
#[derive(Debug)]
pub struct Slot<T> {
    /// The value, once set, and the waiting task.
    inner: Rc<RefCell<(Option<T>, Option<Waker>)>>,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot { inner: self.inner.clone() }
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot { inner: Rc::new(RefCell::new((None, None))) }
    }
}

impl<T> Slot<T> {
    /// Sets the value and wakes the waiter.
    pub fn set(&self, value: T) {
        let waker = {
            let mut inner = self.inner.borrow_mut();
            inner.0 = Some(value);
            inner.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Waits for the value.
    pub fn wait(&self) -> SlotWait<'_, T> {
        SlotWait { slot: self }
    }
}

/// Future returned by [`Slot::wait`].
#[derive(Debug)]
pub struct SlotWait<'a, T> {
    /// The slot waited on.
    slot: &'a Slot<T>,
}

impl<T> Future for SlotWait<'_, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut inner = self.slot.inner.borrow_mut();
        match inner.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                inner.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// An event any number of tasks wait for; `notify` wakes all of them. A
/// waiter that registered before a `notify` is woken by it even if it has
/// not been polled since (the generation counter).
#[derive(Debug, Default)]
pub struct Event {
    /// Bumped on every notify.
    generation: Cell<u64>,
    /// Tasks waiting.
    waiters: RefCell<Vec<Waker>>,
}

impl Event {
    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Waits for the next notify.
    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, generation: self.generation.get() }
    }
}

/// Future returned by [`Event::wait`].
#[derive(Debug)]
pub struct EventWait<'a> {
    /// The event waited on.
    event: &'a Event,
    /// Generation when the wait began.
    generation: u64,
}

impl Future for EventWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut waiters = self.event.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
