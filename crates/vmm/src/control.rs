//! Control of a running VMM from other threads (the API server): a request channel that
//! wakes the event loop, where requests are served with the devices quiescent. The
//! requests and answers are the API's wire types ([`forkvm_api::wire`]).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

pub use forkvm_api::wire::{
    ChildInfo, ChildShare, ChildSpec, ControlError, DeviceInfo, ForkOutcome, ForkRequest, Request,
    Response, RunState, TemplateInfo, VmInfo,
};
use vmm_sys_util::eventfd::EventFd;

pub use forkvm_api::wire::error_chain;

/// A request, the moment its caller stops waiting, and where the answer goes.
pub(crate) type Envelope = (
    Request,
    std::time::Instant,
    Sender<Result<Response, ControlError>>,
);

/// A cloneable handle other threads use to send requests to the VMM.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    tx: Sender<Envelope>,
    wake: Arc<EventFd>,
}

impl ControlHandle {
    /// Sends `req` and waits for the answer, at most [`deadline`]`(&req)`: a VMM that
    /// does not answer by then is an error ([`ControlError::TimedOut`]), not a hang, and
    /// a request not yet started by then is dropped unserved. (One already under way
    /// completes: the error says it may still take effect.)
    pub fn call(&self, req: Request) -> Result<Response, ControlError> {
        self.call_within(req, None)
    }

    /// [`ControlHandle::call`] with another deadline than the request's own.
    pub fn call_within(
        &self,
        req: Request,
        limit: Option<Duration>,
    ) -> Result<Response, ControlError> {
        let limit = limit.unwrap_or_else(|| deadline(&req));
        let what = request_name(&req);
        let (tx, rx) = channel();
        let expires = std::time::Instant::now() + limit;
        self.tx
            .send((req, expires, tx))
            .map_err(|_| ControlError::Gone)?;
        self.wake.write(1).map_err(|_| ControlError::Gone)?;
        match rx.recv_timeout(limit) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Disconnected) => Err(ControlError::Gone),
            Err(RecvTimeoutError::Timeout) => Err(ControlError::TimedOut(format!(
                "the VMM did not answer {what} within {} s (busy or stuck); if it had started \
                 it, it may still take effect",
                limit.as_secs_f64()
            ))),
        }
    }
}

/// How long a request may take to be answered: seconds for the quick ones (30 s, as they
/// may wait behind a fork or a slow event); a fork as long as its children may take to
/// start ([`crate::fork::start_deadline`]) plus a minute; a template save an hour
/// (writing a large guest's memory).
pub fn deadline(req: &Request) -> Duration {
    match req {
        Request::Info | Request::Pause | Request::Resume | Request::Stop => Duration::from_secs(30),
        Request::Fork(f) => crate::fork::start_deadline(f.count) + Duration::from_secs(60),
        Request::SaveTemplate(_) => Duration::from_secs(3600),
    }
}

/// How long a client of the API should wait for the answer to `req`: the VM's own
/// [`deadline`] and a margin for the connection, so the VM answers (or says it timed
/// out) before the client gives up.
pub fn client_wait(req: &Request) -> Duration {
    deadline(req) + Duration::from_secs(30)
}

/// A request's name in messages.
fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Info => "info",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Stop => "stop",
        Request::Fork(_) => "fork",
        Request::SaveTemplate(_) => "template save",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmm_that_does_not_answer_is_a_timeout_not_a_hang() {
        let (handle, inbox) = control_channel().unwrap();
        let t0 = std::time::Instant::now();
        let e = handle
            .call_within(Request::Pause, Some(Duration::from_millis(200)))
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(&e, ControlError::TimedOut(m) if m.starts_with("the VMM did not answer pause within 0.2 s")),
            "{e:?}"
        );
        // The request stayed queued, marked expired: the VMM drops it unserved.
        let (req, expires, reply) = inbox.rx.try_recv().unwrap();
        assert_eq!(req, Request::Pause);
        assert!(std::time::Instant::now() > expires);
        let _ = reply.send(Ok(Response::Done));
        drop(inbox);
        assert_eq!(handle.call(Request::Info), Err(ControlError::Gone));
    }

    #[test]
    fn deadlines_fit_the_request() {
        assert_eq!(deadline(&Request::Stop), Duration::from_secs(30));
        let fork = |count| {
            deadline(&Request::Fork(ForkRequest {
                count,
                ..ForkRequest::default()
            }))
        };
        assert!(fork(100) > fork(1) + Duration::from_secs(90));
        let req = Request::Fork(ForkRequest {
            count: 1000,
            ..ForkRequest::default()
        });
        assert!(client_wait(&req) > deadline(&req));
    }
}
