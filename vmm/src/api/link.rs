//! The link from the API threads to the device event loop: a channel of commands and
//! an eventfd that wakes the loop. The API thread waits for the reply with a
//! timeout; the loop never waits on the API.

use std::sync::mpsc;

use vmm_sys_util::eventfd::EventFd;

use super::{ApiError, Backend, Command, CHECKPOINT_TIMEOUT, REPLY_TIMEOUT};

type Reply = Result<serde_json::Value, ApiError>;

/// A command waiting for the device loop, with the way back to its requester.
pub struct Pending {
    /// The command.
    pub cmd: Command,
    reply: mpsc::Sender<Reply>,
}

impl Pending {
    /// Answers the requester (who may have given up waiting: then nothing happens).
    pub fn reply(self, r: Reply) {
        let _ = self.reply.send(r);
    }
}

/// The API side: sends each command to the loop and waits for its answer.
pub struct LinkBackend {
    tx: mpsc::Sender<Pending>,
    evt: EventFd,
}

/// The device loop's side: the eventfd to watch and the commands to carry out.
pub struct Inbox {
    rx: mpsc::Receiver<Pending>,
    evt: EventFd,
}

/// A linked pair: the API side to install in an [`super::Endpoint`], the loop side
/// to watch.
pub fn link() -> std::io::Result<(LinkBackend, Inbox)> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        LinkBackend {
            tx,
            evt: evt.try_clone()?,
        },
        Inbox { rx, evt },
    ))
}

impl Inbox {
    /// The eventfd the loop watches.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Every command sent so far (clears the eventfd first, so a command sent
    /// meanwhile wakes the loop again).
    pub fn drain(&self) -> Vec<Pending> {
        let _ = self.evt.read();
        self.rx.try_iter().collect()
    }
}

impl Backend for LinkBackend {
    fn handle(&self, cmd: Command) -> Reply {
        let (reply, answer) = mpsc::channel();
        self.tx
            .send(Pending { cmd, reply })
            .map_err(|_| ApiError::unavailable("the run has ended"))?;
        let _ = self.evt.write(1);
        let timeout = match cmd {
            Command::Checkpoint { wait: true } => CHECKPOINT_TIMEOUT,
            _ => REPLY_TIMEOUT,
        };
        match answer.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiError::unavailable(format!(
                "the VMM did not answer within {} s",
                timeout.as_secs()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ApiError::unavailable(
                "the run ended before the command was carried out",
            )),
        }
    }
}
