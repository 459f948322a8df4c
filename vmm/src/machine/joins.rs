//! Standbys that dial a running primary (`standby --join`): a thread accepts them
//! ([`crate::replication::join::JoinListener`]) and hands each pair of connections
//! to the device loop, where the epoch engine attaches a sink over them if it runs
//! unprotected, or turns the standby away if it has one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use devices::bus::lock_recover;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::build::os_err;
use crate::epoch::EpochLoop;
use crate::replication::join::{JoinListener, Joined};
use crate::replication::peer::{PeerConfig, PeerSink, SharedFence};
use crate::VmmError;

/// The device loop's side: builds a sink for each standby that joined.
pub(super) struct Joins {
    /// Tells the accepting thread to stop (and free the address).
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    inbox: Receiver<Joined>,
    wake: EventFd,
    session: PeerConfig,
    fence: Option<SharedFence>,
    released: Arc<AtomicU64>,
    lineage: u64,
    engine: Arc<Mutex<EpochLoop>>,
}

impl Joins {
    /// Starts the accepting thread on `listener`; sessions take their settings from
    /// `session` and share `fence`.
    pub(super) fn start(
        mut listener: JoinListener,
        session: PeerConfig,
        fence: Option<SharedFence>,
        released: Arc<AtomicU64>,
        lineage: u64,
        engine: Arc<Mutex<EpochLoop>>,
    ) -> Result<Joins, VmmError> {
        listener.set_max_version(session.wire.max_version);
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("the joins eventfd"))?;
        let ring = wake.try_clone().map_err(os_err("the joins eventfd"))?;
        let (tx, inbox) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("joins".into())
            .spawn(move || loop {
                match listener.accept_unless(&stopping) {
                    Ok(None) => return,
                    Ok(Some(j)) => {
                        if tx.send(j).is_err() {
                            return;
                        }
                        let _ = ring.write(1);
                    }
                    Err(e) => {
                        eprintln!(
                            "mirrorvm: cannot accept standbys any more: {}",
                            devices::ErrorChain(&e)
                        );
                        return;
                    }
                }
            })
            .map_err(os_err("the joins thread"))?;
        Ok(Joins {
            stop,
            thread: Some(thread),
            inbox,
            wake,
            session,
            fence,
            released,
            lineage,
            engine,
        })
    }

    fn take(&mut self, j: Joined) {
        let peer = j.peer.clone();
        let sink = PeerSink::joined(
            &self.session,
            self.fence.clone(),
            self.released.clone(),
            self.lineage,
            j,
        );
        let mut lp = lock_recover(&self.engine);
        match lp.engine().attach(Box::new(sink)) {
            Ok(Ok(())) => eprintln!("mirrorvm: standby {peer} joined: copying to it"),
            Ok(Err(mut refused)) => {
                let why = "this primary has a standby, or is not running unprotected";
                eprintln!("mirrorvm: turned away the standby at {peer}: {why}");
                refused.decline(why);
            }
            Err(e) => eprintln!(
                "mirrorvm: cannot start protecting with the standby at {peer}: {}",
                devices::ErrorChain(&e)
            ),
        }
    }
}

impl Drop for Joins {
    /// Stops accepting, and waits until the address is free (at most the time a
    /// dialing standby has to send its Join).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl MutEventSubscriber for Joins {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            tracing::warn!("cannot watch for standbys that join: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(j) = self.inbox.try_recv() {
            self.take(j);
        }
    }
}
