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
///
/// A single waiter is kept inline: most events (a connection's send queue,
/// its close) have one waiter at most, and an idle connection then holds no
/// waiter list on the heap.
#[derive(Debug, Default)]
pub struct Event {
    /// Bumped on every notify.
    generation: Cell<u64>,
    /// Tasks waiting.
    waiters: RefCell<Waiters>,
}

/// The tasks waiting for an event: one inline, more on the heap.
#[derive(Debug, Default)]
enum Waiters {
    /// Nobody waits.
    #[default]
    None,
    /// One task waits (the usual case).
    One(Waker),
    /// Several tasks wait.
    Many(Vec<Waker>),
}

impl Event {
    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        match waiters {
            Waiters::None => {}
            Waiters::One(w) => w.wake(),
            Waiters::Many(ws) => ws.into_iter().for_each(Waker::wake),
        }
    }

    /// Waits for the next notify.
    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, generation: self.generation.get() }
    }

    /// Whether any task waits.
    pub fn has_waiters(&self) -> bool {
        !matches!(*self.waiters.borrow(), Waiters::None)
    }

    /// The generation: how many notifies there have been.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Ready with the generation if there was a notify since `generation`;
    /// otherwise the task is woken by the next one.
    pub fn poll_since(&self, generation: u64, cx: &mut Context<'_>) -> Poll<u64> {
        let now = self.generation.get();
        if now != generation {
            return Poll::Ready(now);
        }
        let waker = cx.waker();
        let mut waiters = self.waiters.borrow_mut();
        *waiters = match std::mem::take(&mut *waiters) {
            Waiters::None => Waiters::One(waker.clone()),
            Waiters::One(w) if w.will_wake(waker) => Waiters::One(w),
            Waiters::One(w) => Waiters::Many(vec![w, waker.clone()]),
            Waiters::Many(mut ws) => {
                if !ws.iter().any(|w| w.will_wake(waker)) {
                    ws.push(waker.clone());
                }
                Waiters::Many(ws)
            }
        };
        Poll::Pending
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
        self.event.poll_since(self.generation, cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_notify_wakes_every_waiter_once_and_later_waits_see_it_once() {
        let event = Event::default();
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::new(Count(AtomicUsize::new(0)))).collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let start = event.generation();
        assert!(!event.has_waiters());
        for w in wakers.iter().chain(wakers.iter()) {
            // Registering twice keeps one entry per task.
            assert!(event.poll_since(start, &mut Context::from_waker(w)).is_pending());
        }
        assert!(event.has_waiters());
        event.notify();
        assert!(!event.has_waiters(), "a notify takes every waiter");
        assert!(counts.iter().all(|c| c.0.load(Ordering::Relaxed) == 1));
        let now = event.generation();
        assert_eq!(event.poll_since(start, &mut Context::from_waker(&wakers[0])), Poll::Ready(now));
        assert!(event.poll_since(now, &mut Context::from_waker(&wakers[0])).is_pending());
        event.notify();
        assert_eq!(counts[0].0.load(Ordering::Relaxed), 2);
        assert_eq!(counts[1].0.load(Ordering::Relaxed), 1, "only registered waiters are woken");
    }
}
