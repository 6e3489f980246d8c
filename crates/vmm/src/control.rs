//! Control of a running VMM from other threads (the API server): a request channel that
//! wakes the event loop, where requests are served with the devices quiescent. The
//! requests and answers are the API's wire types ([`forkvm_api::wire`]).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

pub use forkvm_api::wire::{
    ChildInfo, ChildSpec, ControlError, DeviceInfo, ForkOutcome, ForkRequest, Request, Response,
    RunState, TemplateInfo, VmInfo,
};
use vmm_sys_util::eventfd::EventFd;

/// `err` and its causes on one line, `outer: inner: innermost`, for errors that travel
/// as text (API answers, logs).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub(crate) type Envelope = (Request, Sender<Result<Response, ControlError>>);

/// A cloneable handle other threads use to send requests to the VMM.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    tx: Sender<Envelope>,
    wake: Arc<EventFd>,
}

impl ControlHandle {
    /// Sends `req` and waits for the answer.
    pub fn call(&self, req: Request) -> Result<Response, ControlError> {
        let (tx, rx) = channel();
        self.tx.send((req, tx)).map_err(|_| ControlError::Gone)?;
        self.wake.write(1).map_err(|_| ControlError::Gone)?;
        rx.recv().map_err(|_| ControlError::Gone)?
    }
}

/// The API server serves a VM through its handle.
impl forkvm_api::Control for ControlHandle {
    fn call(&self, req: Request) -> Result<Response, ControlError> {
        ControlHandle::call(self, req)
    }
}

/// The VMM's end: the request queue and the eventfd that wakes its event loop.
pub(crate) struct ControlInbox {
    pub rx: Receiver<Envelope>,
    pub wake: Arc<EventFd>,
}

/// A connected handle and inbox.
pub(crate) fn control_channel() -> std::io::Result<(ControlHandle, ControlInbox)> {
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let (tx, rx) = channel();
    Ok((
        ControlHandle {
            tx,
            wake: wake.clone(),
        },
        ControlInbox { rx, wake },
    ))
}
